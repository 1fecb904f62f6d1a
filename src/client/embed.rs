//! `clipserve embed`: bulk embedding through `EmbedStream`, shared across one or more servers.
//!
//! Inputs: a folder of images (recursive), a text file of image paths or URLs (one per line), or JSONL with
//! `id` / `image` (path, URL or base64) / `text`. Results are appended to a JSONL journal as they arrive, so a run
//! that stops can be started again and skips every id already written (or already failed); `--format npy` turns
//! the journal into `.npy` arrays with their ids at the end. Items that fail go to the errors file with their
//! code and message, and the run goes on. Calls that fail with UNAVAILABLE or RESOURCE_EXHAUSTED (or a broken
//! stream) are retried with exponential backoff, on any server.

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

use crate::inputs::fetch::is_http_url;
use crate::pb::{embedder_client::EmbedderClient, item::Image, EmbedRequest, Item};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line: {"id", "image_features"?, "text_features"?}.
    Jsonl,
    /// A folder with image_embeddings.npy + image_ids.txt and text_embeddings.npy + text_ids.txt.
    Npy,
    /// A Parquet file with columns id (string), image_features and text_features (list<float32>, null where the
    /// item had no such input).
    Parquet,
}

/// Flags of `clipserve embed`.
#[derive(Debug, Clone, Args)]
pub struct EmbedArgs {
    /// Server to send to (gRPC URL); repeat or comma-separate to share the work across replicas.
    #[arg(long = "server", required = true, value_delimiter = ',')]
    pub servers: Vec<String>,

    /// A folder of images (recursive), a .txt file of image paths or URLs, or a .jsonl file of
    /// {"id", "image", "text"} objects.
    #[arg(long)]
    pub input: PathBuf,

    /// Output: a .jsonl file (jsonl), a folder (npy), or a .parquet file (parquet).
    #[arg(long)]
    pub output: PathBuf,

    /// Output format.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,

    /// Where items that failed are written (JSONL: id, code, message); default: OUTPUT with `.errors.jsonl`.
    #[arg(long)]
    pub errors: Option<PathBuf>,

    /// Items per stream message.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,

    /// Messages in flight per server.
    #[arg(long, default_value_t = 4)]
    pub window: usize,

    /// Unit-length embeddings.
    #[arg(long)]
    pub normalize: bool,

    /// Attempts per message before its items are written to the errors file.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,

    /// API key sent as `authorization: Bearer KEY`.
    #[arg(long, env = "CLIPSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// No progress bar (for logs).
    #[arg(long)]
    pub no_progress: bool,
}

/// Where an input item's image comes from.
#[derive(Debug, Clone)]
enum ImageRef {
    Path(PathBuf),
    Url(String),
    Base64(String),
}

#[derive(Debug, Clone)]
struct Source {
    id: String,
    image: Option<ImageRef>,
    text: Option<String>,
}

#[derive(Deserialize)]
struct JsonlInput {
    id: Option<serde_json::Value>,
    image: Option<String>,
    text: Option<String>,
}

/// One line of the journal (the jsonl output).
#[derive(Serialize, Deserialize)]
struct Record {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_features: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text_features: Option<Vec<f32>>,
}

/// One line of the errors file.
#[derive(Serialize, Deserialize)]
struct Failure {
    id: String,
    code: String,
    message: String,
}

const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "gif", "bmp"];

fn image_ref(s: &str, base: &Path) -> ImageRef {
    if is_http_url(s) {
        ImageRef::Url(s.to_string())
    } else if s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")) {
        ImageRef::Base64(s.to_string())
    } else {
        let p = Path::new(s);
        ImageRef::Path(if p.is_absolute() { p.to_path_buf() } else { base.join(p) })
    }
}

/// Reads the input description into items, in a stable order.
fn read_input(input: &Path) -> anyhow::Result<Vec<Source>> {
    if input.is_dir() {
        let mut files: Vec<PathBuf> = walkdir::WalkDir::new(input)
            .follow_links(true)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        files.sort();
        return Ok(files
            .into_iter()
            .map(|p| Source {
                id: p.strip_prefix(input).unwrap_or(&p).to_string_lossy().into_owned(),
                image: Some(ImageRef::Path(p)),
                text: None,
            })
            .collect());
    }
    let base = input.parent().unwrap_or(Path::new("."));
    let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let jsonl = input.extension().is_some_and(|e| e == "jsonl" || e == "ndjson");
    let mut items = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if jsonl {
            let j: JsonlInput =
                serde_json::from_str(line).with_context(|| format!("{} line {}", input.display(), n + 1))?;
            let id = match j.id {
                Some(serde_json::Value::String(s)) => s,
                Some(v) => v.to_string(),
                None => (n + 1).to_string(),
            };
            items.push(Source { id, image: j.image.as_deref().map(|s| image_ref(s, base)), text: j.text });
        } else {
            items.push(Source { id: line.to_string(), image: Some(image_ref(line, base)), text: None });
        }
    }
    Ok(items)
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

/// A message's worth of items, with the attempts it has had.
struct Chunk {
    items: Vec<Source>,
    attempts: u32,
}

/// Messages sent on one stream and not answered yet, oldest first, with the items each carried.
type InFlight = VecDeque<(Chunk, Vec<Source>)>;

/// What the stream drivers share.
struct Shared {
    queue: Mutex<VecDeque<Chunk>>,
    more: Notify,
    /// Items neither written nor failed yet.
    pending: AtomicUsize,
    results: mpsc::UnboundedSender<Outcome>,
    args: EmbedArgs,
}

enum Outcome {
    Done(Record),
    Failed(Failure),
}

impl Shared {
    fn take(&self) -> Option<Chunk> {
        self.queue.lock().unwrap().pop_front()
    }

    fn requeue(&self, mut chunk: Chunk, why: &str) {
        chunk.attempts += 1;
        if chunk.attempts >= self.args.retries {
            for item in chunk.items {
                self.fail(item.id, "UNAVAILABLE", format!("gave up after {} attempts: {why}", chunk.attempts));
            }
            return;
        }
        self.queue.lock().unwrap().push_back(chunk);
        self.more.notify_waiters();
    }

    fn fail(&self, id: String, code: &str, message: String) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let _ = self.results.send(Outcome::Failed(Failure { id, code: code.into(), message }));
        self.more.notify_waiters();
    }

    fn done(&self, record: Record) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let _ = self.results.send(Outcome::Done(record));
        self.more.notify_waiters();
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(7)).min(10_000))
}

/// Loads a chunk's images; items whose file cannot be read fail at once and are left out of the message.
fn to_message(shared: &Shared, chunk: &Chunk) -> (EmbedRequest, Vec<Source>) {
    let mut items = Vec::new();
    let mut sent = Vec::new();
    for s in &chunk.items {
        let image = match &s.image {
            None => None,
            Some(ImageRef::Url(u)) => Some(Image::ImageUrl(u.clone())),
            Some(ImageRef::Base64(b)) => Some(Image::ImageBase64(b.clone())),
            Some(ImageRef::Path(p)) => match std::fs::read(p) {
                Ok(bytes) => Some(Image::ImageBytes(bytes)),
                Err(e) => {
                    shared.fail(s.id.clone(), "NOT_FOUND", format!("cannot read {}: {e}", p.display()));
                    continue;
                }
            },
        };
        items.push(Item { id: s.id.clone(), image, text: s.text.clone() });
        sent.push(s.clone());
    }
    (EmbedRequest { items, normalize: shared.args.normalize }, sent)
}

fn retryable(code: i32) -> bool {
    code == Code::Unavailable as i32 || code == Code::ResourceExhausted as i32
}

/// Drives one server: opens a stream, keeps up to `window` messages in flight, writes what comes back, and
/// reconnects with backoff when the stream breaks. Returns when no work is left.
async fn drive(server: String, shared: Arc<Shared>) {
    let mut failures = 0u32;
    while shared.pending.load(Ordering::SeqCst) > 0 {
        let channel = match Channel::from_shared(server.clone()) {
            Ok(endpoint) => endpoint.connect_timeout(Duration::from_secs(5)).connect().await,
            Err(e) => {
                tracing::error!(%server, "invalid server address: {e}");
                return;
            }
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                tracing::warn!(%server, "cannot connect ({e}); retrying");
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        let mut client =
            EmbedderClient::new(channel).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20);
        let (tx, rx) = mpsc::channel::<EmbedRequest>(shared.args.window.max(1));
        let in_flight: Arc<Mutex<InFlight>> = Arc::default();
        let slots = Arc::new(tokio::sync::Semaphore::new(shared.args.window.max(1)));
        let sender = {
            let (shared, in_flight, slots) = (shared.clone(), in_flight.clone(), slots.clone());
            tokio::spawn(async move {
                loop {
                    let permit = slots.clone().acquire_owned().await.expect("semaphore");
                    let chunk = loop {
                        let notified = shared.more.notified();
                        if let Some(c) = shared.take() {
                            break Some(c);
                        }
                        if shared.pending.load(Ordering::SeqCst) == 0 {
                            break None;
                        }
                        // Wake up now and then: work can come back from another server's broken stream.
                        let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
                    };
                    let Some(chunk) = chunk else { return };
                    let (message, sent) = to_message(&shared, &chunk);
                    if sent.is_empty() {
                        continue; // every item failed to load
                    }
                    in_flight.lock().unwrap().push_back((chunk, sent));
                    permit.forget();
                    if tx.send(message).await.is_err() {
                        return;
                    }
                }
            })
        };
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(key) = &shared.args.api_key {
            if let Ok(v) = format!("Bearer {key}").parse() {
                request.metadata_mut().insert("authorization", v);
            }
        }
        let broken = match client.embed_stream(request).await {
            Ok(response) => {
                let mut answers = response.into_inner();
                loop {
                    match answers.next().await {
                        Some(Ok(answer)) => {
                            failures = 0;
                            slots.add_permits(1);
                            let Some((chunk, sent)) = in_flight.lock().unwrap().pop_front() else {
                                break Some("an answer for no message".to_string());
                            };
                            let mut retry = Vec::new();
                            for (source, e) in sent.into_iter().zip(answer.embeddings) {
                                match e.error {
                                    Some(err) if retryable(err.code) => retry.push(source),
                                    Some(err) => shared.fail(e.id, code_name(err.code), err.message),
                                    None => shared.done(Record {
                                        id: e.id,
                                        image_features: (!e.image_features.is_empty()).then_some(e.image_features),
                                        text_features: (!e.text_features.is_empty()).then_some(e.text_features),
                                    }),
                                }
                            }
                            if !retry.is_empty() {
                                tokio::time::sleep(backoff(chunk.attempts + 1)).await;
                                shared
                                    .requeue(Chunk { items: retry, attempts: chunk.attempts }, "retryable item errors");
                            }
                            if shared.pending.load(Ordering::SeqCst) == 0 {
                                break None;
                            }
                        }
                        Some(Err(status)) => break Some(format!("{:?}: {}", status.code(), status.message())),
                        None if shared.pending.load(Ordering::SeqCst) == 0 => break None,
                        None => break Some("stream ended early".into()),
                    }
                }
            }
            Err(status) => Some(format!("{:?}: {}", status.code(), status.message())),
        };
        sender.abort();
        // Whatever was sent and not answered goes back to the queue, for this server or another.
        let unanswered: Vec<_> = in_flight.lock().unwrap().drain(..).collect();
        if let Some(why) = broken {
            failures += 1;
            tracing::warn!(%server, unanswered = unanswered.len(), "stream broke ({why}); retrying");
            for (chunk, _) in unanswered {
                shared.requeue(chunk, &why);
            }
            tokio::time::sleep(backoff(failures)).await;
        }
    }
}

fn code_name(code: i32) -> &'static str {
    match Code::from_i32(code) {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Unavailable => "UNAVAILABLE",
        Code::Internal => "INTERNAL",
        Code::Unauthenticated => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

fn journal_path(args: &EmbedArgs) -> PathBuf {
    match args.format {
        Format::Jsonl => args.output.clone(),
        Format::Npy => args.output.join("embeddings.jsonl"),
        // Results accumulate beside the Parquet file, which is written from them at the end.
        Format::Parquet => args.output.with_extension("journal.jsonl"),
    }
}

fn errors_path(args: &EmbedArgs) -> PathBuf {
    args.errors.clone().unwrap_or_else(|| match args.format {
        Format::Jsonl | Format::Parquet => args.output.with_extension("errors.jsonl"),
        Format::Npy => args.output.join("errors.jsonl"),
    })
}

/// Runs `clipserve embed`.
pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(embed(args))
}

async fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch > 0 && args.window > 0 && args.retries > 0,
        "--batch, --window, --retries must be positive"
    );
    if args.format == Format::Npy {
        std::fs::create_dir_all(&args.output)?;
    }
    let (journal, errors) = (journal_path(&args), errors_path(&args));
    let items = read_input(&args.input)?;
    let total = items.len();
    let mut seen = HashSet::new();
    if let Some(dup) = items.iter().find(|s| !seen.insert(s.id.as_str())) {
        anyhow::bail!("id {:?} appears twice in {}", dup.id, args.input.display());
    }
    let mut skip = ids_in(&journal)?;
    skip.extend(ids_in(&errors)?);
    let todo: Vec<Source> = items.into_iter().filter(|s| !skip.contains(&s.id)).collect();
    eprintln!(
        "{total} items in {}; {} already done, {} to embed on {} server(s)",
        args.input.display(),
        total - todo.len(),
        todo.len(),
        args.servers.len()
    );

    let progress = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(todo.len() as u64)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items  {per_sec}  ETA {eta}  {msg}")
            .expect("progress template"),
    );

    let (results_tx, mut results_rx) = mpsc::unbounded_channel();
    let pending = todo.len();
    let mut queue = VecDeque::new();
    let mut rest = todo;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(args.batch));
        queue.push_back(Chunk { items: std::mem::replace(&mut rest, tail), attempts: 0 });
    }
    let shared = Arc::new(Shared {
        queue: Mutex::new(queue),
        more: Notify::new(),
        pending: AtomicUsize::new(pending),
        results: results_tx,
        args: args.clone(),
    });

    // One writer: appends results and failures as they come, flushed so that an interrupted run can resume.
    let open = |p: &Path| -> anyhow::Result<BufWriter<std::fs::File>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("{}", p.display()))?;
        Ok(BufWriter::new(f))
    };
    let (mut out, mut err) = (open(&journal)?, open(&errors)?);
    let writer = {
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, usize)> {
            let (mut ok, mut failed) = (0usize, 0usize);
            while let Some(outcome) = results_rx.blocking_recv() {
                match outcome {
                    Outcome::Done(r) => {
                        serde_json::to_writer(&mut out, &r)?;
                        out.write_all(b"\n")?;
                        ok += 1;
                    }
                    Outcome::Failed(f) => {
                        serde_json::to_writer(&mut err, &f)?;
                        err.write_all(b"\n")?;
                        failed += 1;
                        progress.set_message(format!("{failed} failed"));
                    }
                }
                progress.inc(1);
                if results_rx.is_empty() {
                    out.flush()?;
                    err.flush()?;
                }
            }
            out.flush()?;
            err.flush()?;
            Ok((ok, failed))
        })
    };
    let drivers: Vec<_> = args.servers.iter().map(|s| tokio::spawn(drive(s.clone(), shared.clone()))).collect();
    for d in drivers {
        d.await?;
    }
    let unfinished = shared.pending.load(Ordering::SeqCst);
    drop(shared);
    let (ok, failed) = writer.await??;
    progress.finish();
    eprintln!("embedded {ok}, failed {failed} (see {}), written to {}", errors.display(), journal.display());
    anyhow::ensure!(unfinished == 0, "{unfinished} items were left unsent: every server stayed unreachable");
    match args.format {
        Format::Jsonl => {}
        Format::Npy => write_npy(&journal, &args.output)?,
        Format::Parquet => write_parquet(&journal, &args.output)?,
    }
    Ok(())
}

/// Writes the journal's records as one Parquet file (snappy-compressed).
fn write_parquet(journal: &Path, path: &Path) -> anyhow::Result<()> {
    use arrow_array::builder::{Float32Builder, ListBuilder, StringBuilder};
    use arrow_array::{ArrayRef, RecordBatch};
    let mut ids = StringBuilder::new();
    let mut images = ListBuilder::new(Float32Builder::new());
    let mut texts = ListBuilder::new(Float32Builder::new());
    for line in std::io::BufReader::new(std::fs::File::open(journal)?).lines() {
        let Ok(r) = serde_json::from_str::<Record>(&line?) else { continue };
        ids.append_value(&r.id);
        for (v, column) in [(r.image_features, &mut images), (r.text_features, &mut texts)] {
            match v {
                Some(v) => {
                    column.values().append_slice(&v);
                    column.append(true);
                }
                None => column.append(false),
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
fn write_npy(journal: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut images: (Vec<String>, Vec<f32>, usize) = Default::default();
    let mut texts: (Vec<String>, Vec<f32>, usize) = Default::default();
    for line in std::io::BufReader::new(std::fs::File::open(journal)?).lines() {
        let Ok(r) = serde_json::from_str::<Record>(&line?) else { continue };
        for (v, slot) in [(r.image_features, &mut images), (r.text_features, &mut texts)] {
            if let Some(v) = v {
                slot.2 = v.len();
                slot.0.push(r.id.clone());
                slot.1.extend(v);
            }
        }
    }
    for (name, (ids, values, dim)) in [("image", images), ("text", texts)] {
        if ids.is_empty() {
            continue;
        }
        let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {dim}), }}", ids.len());
        // .npy v1: magic, version, header length, header padded with spaces to a multiple of 64 bytes.
        let mut h = header.into_bytes();
        let total = 10 + h.len() + 1;
        h.extend(std::iter::repeat_n(b' ', (64 - total % 64) % 64));
        h.push(b'\n');
        let mut f = BufWriter::new(std::fs::File::create(dir.join(format!("{name}_embeddings.npy")))?);
        f.write_all(b"\x93NUMPY\x01\x00")?;
        f.write_all(&(h.len() as u16).to_le_bytes())?;
        f.write_all(&h)?;
        for x in values {
            f.write_all(&x.to_le_bytes())?;
        }
        f.flush()?;
        std::fs::write(dir.join(format!("{name}_ids.txt")), ids.join("\n") + "\n")?;
    }
    Ok(())
}
