//! Where results go. One writer thread takes the events in order and hands them to a sink: the partitions of
//! `--format clip-retrieval` ([`super::partition`]), or, for the small-job formats, a JSONL journal and an errors
//! file appended as results arrive (a rerun reads their ids back and skips them), turned into `.npy` arrays or a
//! Parquet file once the run is complete.

use std::collections::HashSet;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::driver::{Event, Failure, Record, Shared};
use super::input::Skip;
use super::{npy, partition, Dtype, EmbedArgs, Format, Summary};

/// Receives the events of a run.
pub(super) trait Sink: Send {
    /// What an earlier run finished.
    fn skip(&self) -> anyhow::Result<Skip>;
    fn start(&mut self, unit: u64) -> anyhow::Result<()>;
    fn done(&mut self, unit: u64, pos: u64, record: Record) -> anyhow::Result<()>;
    fn failed(&mut self, unit: u64, pos: u64, failure: Failure) -> anyhow::Result<()>;
    fn end(&mut self, unit: u64, count: u64) -> anyhow::Result<()>;
    /// No event is waiting: a good time to flush.
    fn idle(&mut self) -> anyhow::Result<()>;
    /// The run is over (`complete`: nothing is left to do). Returns the partitions completed.
    fn finish(&mut self, complete: bool) -> anyhow::Result<u64>;
}

/// The sink of `args.format`.
pub(super) fn open(args: &EmbedArgs) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match args.format {
        Format::ClipRetrieval => Box::new(partition::Partitions::open(args, &errors_path(args))?),
        _ => Box::new(Journal::open(args)?),
    })
}

fn journal_path(args: &EmbedArgs) -> PathBuf {
    match args.format {
        Format::Jsonl | Format::ClipRetrieval => args.output.clone(),
        Format::Npy => args.output.join("embeddings.jsonl"),
        // Results accumulate beside the Parquet file, which is written from them at the end.
        Format::Parquet => args.output.with_extension("journal.jsonl"),
    }
}

/// The errors file (a folder of errors_N.jsonl for clip-retrieval).
pub(super) fn errors_path(args: &EmbedArgs) -> PathBuf {
    args.errors.clone().unwrap_or_else(|| match args.format {
        Format::Jsonl | Format::Parquet => args.output.with_extension("errors.jsonl"),
        Format::Npy => args.output.join("errors.jsonl"),
        Format::ClipRetrieval => args.output.join("errors"),
    })
}

/// Writes every event to `sink` until `Event::Finish`; returns the counts.
pub(super) fn write_all(
    mut sink: Box<dyn Sink>,
    mut events: mpsc::UnboundedReceiver<Event>,
    shared: &Arc<Shared>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut handled = 0usize;
    let mut write = || -> anyhow::Result<()> {
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::Start(unit) => sink.start(unit)?,
                Event::Done { unit, pos, record } => {
                    summary.embedded += 1;
                    progress.inc(1);
                    sink.done(unit, pos, record)?;
                }
                Event::Failed { unit, pos, failure } => {
                    summary.failed += 1;
                    progress.inc(1);
                    progress.set_message(format!("{} failed", summary.failed));
                    sink.failed(unit, pos, failure)?;
                }
                Event::End { unit, count } => sink.end(unit, count)?,
                Event::Finish { complete } => {
                    sink.idle()?;
                    summary.partitions = sink.finish(complete)?;
                    return Ok(());
                }
            }
            handled += 1;
            if events.is_empty() {
                sink.idle()?;
                shared.written(std::mem::take(&mut handled));
            } else if handled >= 256 {
                shared.written(std::mem::take(&mut handled));
            }
        }
        Ok(())
    };
    let result = write();
    if result.is_err() {
        // The output cannot be written: the run stops.
        shared.abort();
    }
    result.map(|()| summary)
}

/// The small-job formats: results appended to a JSONL journal, failures to an errors file.
struct Journal {
    format: Format,
    dtype: Dtype,
    output: PathBuf,
    journal: PathBuf,
    errors: PathBuf,
    out: BufWriter<std::fs::File>,
    err: BufWriter<std::fs::File>,
}

impl Journal {
    fn open(args: &EmbedArgs) -> anyhow::Result<Journal> {
        if args.format == Format::Npy {
            std::fs::create_dir_all(&args.output)?;
        }
        let (journal, errors) = (journal_path(args), errors_path(args));
        let open = |p: &Path| -> anyhow::Result<BufWriter<std::fs::File>> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("{}", p.display()))?;
            Ok(BufWriter::new(f))
        };
        Ok(Journal {
            format: args.format,
            dtype: args.dtype(),
            output: args.output.clone(),
            out: open(&journal)?,
            err: open(&errors)?,
            journal,
            errors,
        })
    }
}

/// Ids already written to `path` (a journal or errors file), so a new run skips them.
fn ids_in(path: &Path) -> anyhow::Result<HashSet<String>> {
    #[derive(Deserialize)]
    struct Id {
        id: String,
    }
    let mut ids = HashSet::new();
    if let Ok(file) = std::fs::File::open(path) {
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            // A line cut short by an interrupted run is not counted: its item runs again.
            if let Ok(Id { id }) = serde_json::from_str(&line) {
                ids.insert(id);
            }
        }
    }
    Ok(ids)
}

impl Sink for Journal {
    fn skip(&self) -> anyhow::Result<Skip> {
        let mut ids = ids_in(&self.journal)?;
        ids.extend(ids_in(&self.errors)?);
        Ok(Skip::Ids(ids))
    }

    fn start(&mut self, _unit: u64) -> anyhow::Result<()> {
        Ok(())
    }

    fn done(&mut self, _unit: u64, _pos: u64, record: Record) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, &record)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    fn failed(&mut self, _unit: u64, _pos: u64, failure: Failure) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.err, &failure)?;
        self.err.write_all(b"\n")?;
        Ok(())
    }

    fn end(&mut self, _unit: u64, _count: u64) -> anyhow::Result<()> {
        Ok(())
    }

    fn idle(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        self.err.flush()?;
        Ok(())
    }

    fn finish(&mut self, complete: bool) -> anyhow::Result<u64> {
        self.idle()?;
        if complete {
            match self.format {
                Format::Npy => write_npy(&self.journal, &self.output, self.dtype)?,
                Format::Parquet => write_parquet(&self.journal, &self.output)?,
                Format::Jsonl | Format::ClipRetrieval => {}
            }
        }
        Ok(0)
    }
}

/// Writes the journal's records as one Parquet file (snappy-compressed): `id`, and `image_features` /
/// `text_features` as fixed-size lists of float32.
fn write_parquet(journal: &Path, path: &Path) -> anyhow::Result<()> {
    use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, StringBuilder};
    use arrow_array::{ArrayRef, RecordBatch};
    let records = || -> anyhow::Result<Vec<Record>> {
        let mut out = Vec::new();
        for line in std::io::BufReader::new(std::fs::File::open(journal)?).lines() {
            if let Ok(r) = serde_json::from_str::<Record>(&line?) {
                out.push(r);
            }
        }
        Ok(out)
    };
    let records = records()?;
    let dim_of = |f: fn(&Record) -> &Option<Vec<f32>>| records.iter().find_map(|r| f(r).as_ref().map(Vec::len));
    let dims = (dim_of(|r| &r.image_features), dim_of(|r| &r.text_features));
    let dim = dims.0.or(dims.1).unwrap_or(0);
    anyhow::ensure!(dims.0.unwrap_or(dim) == dims.1.unwrap_or(dim), "image and text embeddings differ in size");
    let mut ids = StringBuilder::new();
    let mut images = FixedSizeListBuilder::new(Float32Builder::new(), dim as i32);
    let mut texts = FixedSizeListBuilder::new(Float32Builder::new(), dim as i32);
    for r in records {
        ids.append_value(&r.id);
        for (v, column) in [(r.image_features, &mut images), (r.text_features, &mut texts)] {
            match v {
                Some(v) => {
                    anyhow::ensure!(v.len() == dim, "{}: an embedding of {} values, not {dim}", r.id, v.len());
                    column.values().append_slice(&v);
                    column.append(true);
                }
                None => {
                    column.values().append_nulls(dim);
                    column.append(false);
                }
            }
        }
    }
    let batch = RecordBatch::try_from_iter([
        ("id", Arc::new(ids.finish()) as ArrayRef),
        ("image_features", Arc::new(images.finish()) as ArrayRef),
        ("text_features", Arc::new(texts.finish()) as ArrayRef),
    ])?;
    let tmp = path.with_extension("parquet.tmp");
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&tmp)?, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes image_embeddings.npy / image_ids.txt and text_embeddings.npy / text_ids.txt from the journal.
fn write_npy(journal: &Path, dir: &Path, dtype: Dtype) -> anyhow::Result<()> {
    let mut images: (Vec<String>, Vec<u8>, usize) = Default::default();
    let mut texts: (Vec<String>, Vec<u8>, usize) = Default::default();
    for line in std::io::BufReader::new(std::fs::File::open(journal)?).lines() {
        let Ok(r) = serde_json::from_str::<Record>(&line?) else { continue };
        for (v, slot) in [(r.image_features, &mut images), (r.text_features, &mut texts)] {
            if let Some(v) = v {
                slot.2 = v.len();
                slot.0.push(r.id.clone());
                npy::encode(&v, dtype, &mut slot.1);
            }
        }
    }
    for (name, (ids, values, dim)) in [("image", images), ("text", texts)] {
        if ids.is_empty() {
            continue;
        }
        let mut f = BufWriter::new(std::fs::File::create(dir.join(format!("{name}_embeddings.npy")))?);
        f.write_all(&npy::header(dtype, ids.len() as u64, dim))?;
        f.write_all(&values)?;
        f.flush()?;
        std::fs::write(dir.join(format!("{name}_ids.txt")), ids.join("\n") + "\n")?;
    }
    Ok(())
}
