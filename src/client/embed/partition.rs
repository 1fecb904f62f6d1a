//! `--format clip-retrieval`: the layout clip-retrieval's inference writes and autofaiss / embedding-reader
//! index, one partition N per input unit:
//!
//! ```text
//! OUTPUT/img_emb/img_emb_N.npy          rows x dim, float16 or float32
//! OUTPUT/text_emb/text_emb_N.npy        rows x dim
//! OUTPUT/metadata/metadata_N.parquet    key, caption, url, has_image, has_text: one row per array row
//! OUTPUT/errors/errors_N.jsonl          the unit's failed items (only when some failed)
//! ```
//!
//! Rows are in input order. An array is written when some row of the partition has that modality; a row without
//! it holds zeros there (and `has_image` / `has_text` say so). While a partition is open its rows go, in arrival
//! order, to hidden `.rows` files beside the arrays, so memory holds only its metadata; once every item of the
//! unit is written or failed, the arrays are written in input order under hidden `.partial` names, synced, and
//! renamed, the metadata last: a partition whose metadata file exists is complete, and a rerun skips it. A
//! partition interrupted at any point is redone from the start.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::driver::{Failure, Record};
use super::input::Skip;
use super::output::Sink;
use super::{npy, Dtype, EmbedArgs};

/// The metadata row of one embedded item.
struct Row {
    pos: u64,
    key: String,
    caption: Option<String>,
    url: Option<String>,
    has_image: bool,
    has_text: bool,
}

/// Embeddings of one modality of an open partition, one row per metadata row in arrival order (zeros for rows
/// without this modality).
struct Rows {
    path: PathBuf,
    file: BufWriter<std::fs::File>,
}

/// A partition being written.
struct Partial {
    expected: Option<u64>,
    settled: u64,
    rows: Vec<Row>,
    image: Option<Rows>,
    text: Option<Rows>,
    failures: Vec<(u64, Failure)>,
}

/// The clip-retrieval sink.
pub(super) struct Partitions {
    root: PathBuf,
    errors: PathBuf,
    dtype: Dtype,
    dim: Option<usize>,
    open: HashMap<u64, Partial>,
    completed: u64,
    buf: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Modality {
    Image,
    Text,
}

impl Modality {
    fn dir(self) -> &'static str {
        match self {
            Modality::Image => "img_emb",
            Modality::Text => "text_emb",
        }
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)?.sync_all().with_context(|| format!("syncing {}", dir.display()))
}

fn remove_if_there(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e).context(format!("removing {}", path.display())))
        }
        _ => Ok(()),
    }
}

impl Partitions {
    pub fn open(args: &EmbedArgs, errors: &Path) -> anyhow::Result<Partitions> {
        let root = args.output.clone();
        for dir in [root.join("img_emb"), root.join("text_emb"), root.join("metadata"), errors.to_path_buf()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Partitions {
            root,
            errors: errors.to_path_buf(),
            dtype: args.dtype(),
            dim: None,
            open: HashMap::new(),
            completed: 0,
            buf: Vec::new(),
        })
    }

    fn array(&self, m: Modality, unit: u64) -> PathBuf {
        self.root.join(m.dir()).join(format!("{}_{unit}.npy", m.dir()))
    }

    fn rows_file(&self, m: Modality, unit: u64) -> PathBuf {
        self.root.join(m.dir()).join(format!(".{}_{unit}.rows", m.dir()))
    }

    fn metadata(&self, unit: u64) -> PathBuf {
        self.root.join("metadata").join(format!("metadata_{unit}.parquet"))
    }

    fn errors_file(&self, unit: u64) -> PathBuf {
        self.errors.join(format!("errors_{unit}.jsonl"))
    }

    /// The hidden name a file is written under before it is renamed to `path`.
    fn partial(path: &Path) -> PathBuf {
        let name = path.file_name().expect("a file name").to_string_lossy();
        path.with_file_name(format!(".{name}.partial"))
    }

    fn partial_of(&mut self, unit: u64) -> anyhow::Result<&mut Partial> {
        self.open.get_mut(&unit).with_context(|| format!("an item of partition {unit}, which is not open"))
    }

    /// Appends one embedding (or zeros) to a modality's rows, creating them (zeros for the rows before) on the
    /// first embedding of that modality.
    fn append(&mut self, unit: u64, m: Modality, v: Option<&[f32]>) -> anyhow::Result<()> {
        if let Some(v) = v {
            match self.dim {
                None => self.dim = Some(v.len()),
                Some(d) => anyhow::ensure!(d == v.len(), "an embedding of {} values after ones of {d}", v.len()),
            }
        }
        let (dtype, path) = (self.dtype, self.rows_file(m, unit));
        let dim = self.dim.unwrap_or(0);
        let mut buf = std::mem::take(&mut self.buf);
        let p = self.open.get_mut(&unit).expect("an open partition");
        let slot = match m {
            Modality::Image => &mut p.image,
            Modality::Text => &mut p.text,
        };
        let zeros = vec![0f32; dim];
        if slot.is_none() {
            let Some(_) = v else { return Ok(()) };
            // Read back in input order when the partition is complete.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut file = BufWriter::with_capacity(1 << 16, file);
            buf.clear();
            npy::encode(&zeros, dtype, &mut buf);
            for _ in 0..p.rows.len() {
                file.write_all(&buf)?;
            }
            *slot = Some(Rows { path, file });
        }
        let rows = slot.as_mut().expect("rows");
        buf.clear();
        npy::encode(v.unwrap_or(&zeros), dtype, &mut buf);
        rows.file.write_all(&buf)?;
        self.buf = buf;
        Ok(())
    }

    fn settle(&mut self, unit: u64) -> anyhow::Result<()> {
        let p = self.partial_of(unit)?;
        p.settled += 1;
        self.finish_if_done(unit)
    }

    fn finish_if_done(&mut self, unit: u64) -> anyhow::Result<()> {
        let p = self.partial_of(unit)?;
        match p.expected {
            Some(n) if n == p.settled => {
                let p = self.open.remove(&unit).expect("an open partition");
                self.commit(unit, p)?;
                self.completed += 1;
                Ok(())
            }
            Some(n) => {
                anyhow::ensure!(p.settled < n, "partition {unit} got {} items, more than its {n}", p.settled);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Writes a complete partition under its final names.
    fn commit(&mut self, unit: u64, p: Partial) -> anyhow::Result<()> {
        let mut order: Vec<usize> = (0..p.rows.len()).collect();
        order.sort_by_key(|&i| p.rows[i].pos);
        let row_bytes = self.dim.unwrap_or(0) * npy::element_size(self.dtype);
        let mut renames = Vec::new();
        for (m, rows) in [(Modality::Image, p.image), (Modality::Text, p.text)] {
            let path = self.array(m, unit);
            let Some(rows) = rows else {
                // A modality no row has: no array (and none left from an earlier attempt).
                remove_if_there(&path)?;
                continue;
            };
            let raw = rows.file.into_inner().map_err(|e| e.into_error())?;
            let partial = Self::partial(&path);
            let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&partial)?);
            out.write_all(&npy::header(self.dtype, order.len() as u64, self.dim.unwrap_or(0)))?;
            let mut row = vec![0u8; row_bytes];
            for &i in &order {
                raw.read_exact_at(&mut row, (i * row_bytes) as u64)
                    .with_context(|| format!("reading {}", rows.path.display()))?;
                out.write_all(&row)?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            drop(raw);
            remove_if_there(&rows.path)?;
            renames.push((partial, path));
        }
        let errors = self.errors_file(unit);
        if p.failures.is_empty() {
            remove_if_there(&errors)?;
        } else {
            let mut failures = p.failures;
            failures.sort_by_key(|(pos, _)| *pos);
            let partial = Self::partial(&errors);
            let mut out = BufWriter::new(std::fs::File::create(&partial)?);
            for (_, f) in &failures {
                serde_json::to_writer(&mut out, f)?;
                out.write_all(b"\n")?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            renames.push((partial, errors));
        }
        let metadata = self.metadata(unit);
        let partial = Self::partial(&metadata);
        write_metadata(&partial, &p.rows, &order)?;
        let mut dirs = HashSet::new();
        for (from, to) in &renames {
            std::fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
            dirs.insert(to.parent().expect("a folder").to_path_buf());
        }
        for d in &dirs {
            sync_dir(d)?;
        }
        // Last: the metadata file marks the partition complete.
        std::fs::rename(&partial, &metadata)?;
        sync_dir(metadata.parent().expect("a folder"))?;
        Ok(())
    }
}

/// The metadata of a partition, rows in `order`.
fn write_metadata(path: &Path, rows: &[Row], order: &[usize]) -> anyhow::Result<()> {
    use arrow_array::builder::{BooleanBuilder, StringBuilder};
    use arrow_array::{ArrayRef, RecordBatch};
    let (mut key, mut caption, mut url) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    let (mut has_image, mut has_text) = (BooleanBuilder::new(), BooleanBuilder::new());
    for &i in order {
        let r = &rows[i];
        key.append_value(&r.key);
        caption.append_option(r.caption.as_deref());
        url.append_option(r.url.as_deref());
        has_image.append_value(r.has_image);
        has_text.append_value(r.has_text);
    }
    let batch = RecordBatch::try_from_iter([
        ("key", Arc::new(key.finish()) as ArrayRef),
        ("caption", Arc::new(caption.finish()) as ArrayRef),
        ("url", Arc::new(url.finish()) as ArrayRef),
        ("has_image", Arc::new(has_image.finish()) as ArrayRef),
        ("has_text", Arc::new(has_text.finish()) as ArrayRef),
    ])?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.into_inner()?.sync_all()?;
    Ok(())
}

/// The partitions whose metadata file exists.
fn complete_units(dir: &Path) -> anyhow::Result<HashSet<u64>> {
    let mut done = HashSet::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_prefix("metadata_").and_then(|n| n.strip_suffix(".parquet")) {
            if let Ok(n) = n.parse() {
                done.insert(n);
            }
        }
    }
    Ok(done)
}

impl Sink for Partitions {
    fn skip(&self) -> anyhow::Result<Skip> {
        Ok(Skip::Units(complete_units(&self.root.join("metadata"))?))
    }

    fn start(&mut self, unit: u64) -> anyhow::Result<()> {
        // What an interrupted attempt at this partition left.
        for m in [Modality::Image, Modality::Text] {
            remove_if_there(&self.rows_file(m, unit))?;
            remove_if_there(&Self::partial(&self.array(m, unit)))?;
        }
        remove_if_there(&Self::partial(&self.metadata(unit)))?;
        remove_if_there(&Self::partial(&self.errors_file(unit)))?;
        let p = Partial { expected: None, settled: 0, rows: Vec::new(), image: None, text: None, failures: Vec::new() };
        anyhow::ensure!(self.open.insert(unit, p).is_none(), "partition {unit} started twice");
        Ok(())
    }

    fn done(&mut self, unit: u64, pos: u64, r: Record) -> anyhow::Result<()> {
        self.partial_of(unit)?;
        self.append(unit, Modality::Image, r.image_features.as_deref())?;
        self.append(unit, Modality::Text, r.text_features.as_deref())?;
        let row = Row {
            pos,
            key: r.id,
            caption: r.text,
            url: r.url,
            has_image: r.image_features.is_some(),
            has_text: r.text_features.is_some(),
        };
        self.partial_of(unit)?.rows.push(row);
        self.settle(unit)
    }

    fn failed(&mut self, unit: u64, pos: u64, failure: Failure) -> anyhow::Result<()> {
        self.partial_of(unit)?.failures.push((pos, failure));
        self.settle(unit)
    }

    fn end(&mut self, unit: u64, count: u64) -> anyhow::Result<()> {
        self.partial_of(unit)?.expected = Some(count);
        self.finish_if_done(unit)
    }

    fn idle(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn finish(&mut self, _complete: bool) -> anyhow::Result<u64> {
        // Partitions still open were interrupted: their hidden files are redone by the next run.
        for (_, p) in self.open.drain() {
            for rows in [p.image, p.text].into_iter().flatten() {
                let mut file = rows.file;
                let _ = file.flush();
            }
        }
        Ok(self.completed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, image: Option<f32>, text: Option<f32>) -> Record {
        Record {
            id: id.into(),
            image_features: image.map(|x| vec![x; 4]),
            text_features: text.map(|x| vec![x; 4]),
            text: text.map(|_| format!("caption of {id}")),
            url: None,
        }
    }

    #[test]
    fn a_partition_is_written_in_input_order_once_every_item_is_in() {
        let dir = std::env::temp_dir().join(format!("clipserve-partition-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let args = match <crate::cli::Cli as clap::Parser>::parse_from([
            "clipserve",
            "embed",
            "--server",
            "http://x:1",
            "--input",
            "i",
            "--format",
            "clip-retrieval",
            "--dtype",
            "float32",
            "--output",
            dir.to_str().unwrap(),
        ])
        .command
        {
            crate::cli::Command::Embed(a) => a,
            _ => unreachable!(),
        };
        let mut sink = Partitions::open(&args, &dir.join("errors")).unwrap();
        sink.start(7).unwrap();
        // Arrival order 3, 0, 2 (failed), 1; the first row has no image: zeros, once images appear.
        sink.done(7, 3, record("d", None, Some(3.0))).unwrap();
        sink.done(7, 0, record("a", Some(1.0), Some(10.0))).unwrap();
        sink.end(7, 4).unwrap();
        let failure = Failure {
            id: "c".into(),
            code: "INVALID_ARGUMENT".into(),
            reason: "INVALID_IMAGE".into(),
            message: "m".into(),
        };
        sink.failed(7, 2, failure).unwrap();
        assert!(!dir.join("metadata/metadata_7.parquet").exists(), "not complete before its last item");
        assert!(dir.join("img_emb/.img_emb_7.rows").exists());
        sink.done(7, 1, record("b", Some(2.0), None)).unwrap();
        assert_eq!(sink.finish(true).unwrap(), 1);

        let read_npy = |p: &str| {
            let b = std::fs::read(dir.join(p)).unwrap();
            let h = 10 + u16::from_le_bytes([b[8], b[9]]) as usize;
            assert!(std::str::from_utf8(&b[10..h]).unwrap().contains("'shape': (3, 4)"));
            b[h..].chunks(16).map(|r| f32::from_le_bytes(r[..4].try_into().unwrap())).collect::<Vec<_>>()
        };
        assert_eq!(read_npy("img_emb/img_emb_7.npy"), [1.0, 2.0, 0.0]);
        assert_eq!(read_npy("text_emb/text_emb_7.npy"), [10.0, 0.0, 3.0]);
        let errors = std::fs::read_to_string(dir.join("errors/errors_7.jsonl")).unwrap();
        assert_eq!(errors.lines().count(), 1);
        assert!(errors.contains("\"c\""));
        let file = std::fs::File::open(dir.join("metadata/metadata_7.parquet")).unwrap();
        let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        use arrow_array::cast::AsArray;
        let keys: Vec<&str> = batch.column_by_name("key").unwrap().as_string::<i32>().iter().flatten().collect();
        assert_eq!(keys, ["a", "b", "d"]);
        let hidden: Vec<_> = std::fs::read_dir(dir.join("img_emb"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
        match sink.skip().unwrap() {
            Skip::Units(done) => assert_eq!(done, HashSet::from([7])),
            Skip::Ids(_) => panic!(),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
