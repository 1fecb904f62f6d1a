//! `clipserve embed`: bulk embedding through `EmbedStream`, shared across one or more servers.
//!
//! Inputs: a folder of images (recursive), a text file of image paths or URLs (one per line), or JSONL with
//! `id` / `image` (path, URL or base64) / `text`. Results are appended to a JSONL journal as they arrive, so a run
//! that stops can be started again and skips every id already written (or already failed); `--format npy` turns
//! the journal into `.npy` arrays with their ids at the end.
//!
//! Every input ends in exactly one place: a record in the journal or a line in the errors file (id, code, reason,
//! message). Only what may succeed when sent again is retried, with capped exponential backoff, on any server:
//! item errors and failed calls whose reason is retryable (QUEUE_FULL, NOT_READY, ...), and transport failures
//! that carry no server reason (connection refused, a broken stream). Everything else (IMAGE_TOO_LARGE,
//! INVALID_IMAGE, an unreadable file, ...) goes to the errors file at once. A server that cannot be reached
//! `--retries` times in a row is given up; when every server is given up the run stops with an error.

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
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

use crate::error::{status_reason, Reason};
use crate::inputs::fetch::is_http_url;
use crate::pb::{embedder_client::EmbedderClient, item::Image, EmbedRequest, Item, ItemError};

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

    /// Where items that failed are written (JSONL: id, code, reason, message); default: OUTPUT with
    /// `.errors.jsonl`.
    #[arg(long)]
    pub errors: Option<PathBuf>,

    /// Items per stream message.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,

    /// Messages in flight per server.
    #[arg(long, default_value_t = 4)]
    pub window: usize,

    /// Largest stream message sent, in bytes (keep it within the server's --max-message-bytes); messages are
    /// cut short to fit, and a file that cannot fit alone goes to the errors file unread.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_message_bytes: usize,

    /// Unit-length embeddings.
    #[arg(long)]
    pub normalize: bool,

    /// Attempts per item when the failure is retryable, and failed connection attempts in a row before a server
    /// is given up.
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

/// Why an item failed: a gRPC code name, a reason (the server's, or one of the client's `INPUT_*` reasons) and a
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    code: &'static str,
    reason: String,
    message: String,
}

impl Problem {
    fn new(code: &'static str, reason: &str, message: impl Into<String>) -> Problem {
        Problem { code, reason: reason.into(), message: message.into() }
    }

    /// A problem the server reported for one item.
    fn from_item(e: &ItemError) -> Problem {
        Problem { code: code_name(Code::from_i32(e.code)), reason: e.reason.clone(), message: e.message.clone() }
    }

    /// A failed call: the status's code, its reason (empty when it carries none, e.g. a transport failure) and
    /// message.
    fn from_status(status: &tonic::Status) -> Problem {
        let mut message = status.message().to_string();
        if message.is_empty() {
            message = status.code().description().to_string();
        }
        Problem { code: code_name(status.code()), reason: status_reason(status).unwrap_or_default(), message }
    }
}

/// One line of the errors file.
#[derive(Serialize, Deserialize)]
struct Failure {
    id: String,
    code: String,
    reason: String,
    message: String,
}

impl Failure {
    fn new(id: String, p: Problem) -> Failure {
        Failure { id, code: p.code.into(), reason: p.reason, message: p.message }
    }
}

/// Reasons of the errors the client finds itself, before anything is sent.
mod client_reason {
    /// The file does not exist (a missing path, a dangling symlink).
    pub const NOT_FOUND: &str = "INPUT_NOT_FOUND";
    /// The file or folder exists but cannot be read (permissions, I/O error, a symlink loop).
    pub const UNREADABLE: &str = "INPUT_UNREADABLE";
    /// Not a regular file: a FIFO, a socket, a device, a folder named like an image.
    pub const NOT_A_FILE: &str = "INPUT_NOT_A_FILE";
    /// Larger than fits in one message of --max-message-bytes.
    pub const TOO_LARGE: &str = "INPUT_TOO_LARGE";
    /// A line of the input list that cannot be parsed.
    pub const INVALID_LINE: &str = "INPUT_LINE_INVALID";
}

const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "gif", "bmp"];

fn has_image_extension(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

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

fn io_problem(what: &str, path: &Path, e: &std::io::Error) -> Problem {
    let (code, reason) = match e.kind() {
        std::io::ErrorKind::NotFound => ("NOT_FOUND", client_reason::NOT_FOUND),
        std::io::ErrorKind::PermissionDenied => ("PERMISSION_DENIED", client_reason::UNREADABLE),
        _ => ("UNKNOWN", client_reason::UNREADABLE),
    };
    Problem::new(code, reason, format!("cannot {what} {}: {e}", path.display()))
}

/// The input: items to send, and entries that failed before anything was sent (an unlistable folder, a line that
/// cannot be parsed), each with its id.
struct Input {
    items: Vec<Source>,
    failed: Vec<(String, Problem)>,
}

/// Reads the input description into items, in a stable order.
fn read_input(input: &Path) -> anyhow::Result<Input> {
    if input.is_dir() {
        return Ok(read_folder(input));
    }
    let base = input.parent().unwrap_or(Path::new("."));
    let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let jsonl = input.extension().is_some_and(|e| e == "jsonl" || e == "ndjson");
    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = Input { items: Vec::new(), failed: Vec::new() };
    let mut reader = std::io::BufReader::new(file);
    let mut raw = Vec::new();
    for n in 1.. {
        raw.clear();
        if reader.read_until(b'\n', &mut raw).with_context(|| format!("reading {}", input.display()))? == 0 {
            break;
        }
        // A line that cannot be read is one failed item, named after its place in the file.
        let place = format!("{name}:{n}");
        let bad = |message: String| Problem::new("INVALID_ARGUMENT", client_reason::INVALID_LINE, message);
        let Ok(line) = std::str::from_utf8(&raw) else {
            out.failed.push((place, bad(format!("{} line {n} is not UTF-8", input.display()))));
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !jsonl {
            out.items.push(Source { id: line.to_string(), image: Some(image_ref(line, base)), text: None });
            continue;
        }
        match serde_json::from_str::<JsonlInput>(line) {
            Ok(j) => {
                let id = match j.id {
                    Some(serde_json::Value::String(s)) => s,
                    Some(v) => v.to_string(),
                    None => n.to_string(),
                };
                out.items.push(Source { id, image: j.image.as_deref().map(|s| image_ref(s, base)), text: j.text });
            }
            Err(e) => {
                // Keep the line's own id when it has a readable one, so the failure is found under it.
                let id = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| match v.get("id")? {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Number(x) => Some(x.to_string()),
                        _ => None,
                    })
                    .unwrap_or(place);
                out.failed.push((id, bad(format!("{} line {n}: {e}", input.display()))));
            }
        }
    }
    Ok(out)
}

/// Every non-folder entry named like an image, followed through symlinks; entries that cannot be examined (a
/// dangling symlink, a loop) are kept too, so that reading them fails with its reason, and a folder that
/// cannot be listed is a failure of its own.
fn read_folder(input: &Path) -> Input {
    let id_of = |p: &Path| p.strip_prefix(input).unwrap_or(p).to_string_lossy().into_owned();
    let mut paths = Vec::new();
    let mut failed = Vec::new();
    for entry in walkdir::WalkDir::new(input).follow_links(true) {
        match entry {
            Ok(e) if e.file_type().is_dir() => {}
            Ok(e) => {
                if has_image_extension(e.path()) {
                    paths.push(e.into_path());
                }
            }
            Err(e) => {
                let Some(path) = e.path() else { continue };
                if has_image_extension(path) {
                    paths.push(path.to_path_buf());
                } else if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
                    let problem = match e.io_error() {
                        Some(io) => io_problem("list", path, io),
                        None => Problem::new("UNKNOWN", client_reason::UNREADABLE, format!("cannot list: {e}")),
                    };
                    failed.push((id_of(path), problem));
                }
            }
        }
    }
    paths.sort();
    paths.dedup();
    let items =
        paths.into_iter().map(|p| Source { id: id_of(&p), image: Some(ImageRef::Path(p)), text: None }).collect();
    Input { items, failed }
}

/// Reads an image file, refusing what is not a regular file (reading a FIFO would block) or cannot fit in a
/// message.
fn load(path: &Path, limit: usize) -> Result<Vec<u8>, Problem> {
    let meta = std::fs::metadata(path).map_err(|e| io_problem("read", path, &e))?;
    if !meta.is_file() {
        let message = format!("{} is not a regular file", path.display());
        return Err(Problem::new("INVALID_ARGUMENT", client_reason::NOT_A_FILE, message));
    }
    if meta.len() > limit as u64 {
        let message = format!(
            "{} is {} bytes, over the message limit of {limit} (--max-message-bytes)",
            path.display(),
            meta.len()
        );
        return Err(Problem::new("RESOURCE_EXHAUSTED", client_reason::TOO_LARGE, message));
    }
    std::fs::read(path).map_err(|e| io_problem("read", path, &e))
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

/// An item on its way, with the last retryable problem it met (written if it runs out of attempts).
struct Work {
    source: Source,
    last: Option<Problem>,
}

/// A message's worth of items, with the attempts it has had and when it may be sent again.
///
/// Every item not yet written lives in exactly one place: a chunk in the queue, or a chunk in one stream's
/// in-flight list. It leaves that place once, to the journal or to the errors file.
struct Chunk {
    items: Vec<Work>,
    attempts: u32,
    not_before: Instant,
}

impl Chunk {
    fn new(items: Vec<Work>, attempts: u32) -> Chunk {
        Chunk { items, attempts, not_before: Instant::now() }
    }
}

/// Messages sent on one stream and not answered yet, oldest first, each with the items it carried.
type InFlight = VecDeque<Chunk>;

/// What the stream drivers share.
struct Shared {
    queue: Mutex<VecDeque<Chunk>>,
    more: Notify,
    /// Items neither written nor failed yet.
    pending: AtomicUsize,
    /// Turns true once nothing is pending.
    over: watch::Sender<bool>,
    results: mpsc::UnboundedSender<Outcome>,
    args: EmbedArgs,
}

enum Outcome {
    Done(Record),
    Failed(Failure),
}

impl Shared {
    fn is_over(&self) -> bool {
        *self.over.borrow()
    }

    /// The first chunk due to be sent.
    fn take(&self) -> Option<Chunk> {
        let mut queue = self.queue.lock().unwrap();
        let now = Instant::now();
        let i = queue.iter().position(|c| c.not_before <= now)?;
        queue.remove(i)
    }

    /// Puts chunks back at the head of the queue, in their order, to be sent next.
    fn put_front(&self, chunks: impl DoubleEndedIterator<Item = Chunk>) {
        let mut queue = self.queue.lock().unwrap();
        for c in chunks.rev() {
            queue.push_front(c);
        }
        drop(queue);
        self.more.notify_waiters();
    }

    /// Counts an attempt for a chunk whose items met a retryable problem (each item's `last`): it goes back to
    /// the queue after a backoff, or its items to the errors file once `--retries` attempts are spent.
    fn retry(&self, mut chunk: Chunk) {
        chunk.attempts += 1;
        if chunk.attempts >= self.args.retries {
            for w in chunk.items {
                let mut p = w.last.unwrap_or_else(|| Problem::new("UNAVAILABLE", "", "no answer"));
                p.message = format!("gave up after {} attempts: {}", chunk.attempts, p.message);
                self.fail(w.source.id, p);
            }
            return;
        }
        chunk.not_before = Instant::now() + backoff(chunk.attempts);
        self.queue.lock().unwrap().push_back(chunk);
        self.more.notify_waiters();
    }

    fn fail(&self, id: String, problem: Problem) {
        let _ = self.results.send(Outcome::Failed(Failure::new(id, problem)));
        self.settle();
    }

    fn done(&self, record: Record) {
        let _ = self.results.send(Outcome::Done(record));
        self.settle();
    }

    /// One item is written: counts it, and ends the run with the last one.
    fn settle(&self) {
        let before = self.pending.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "an item was settled twice");
        if before == 1 {
            self.over.send_replace(true);
        }
        self.more.notify_waiters();
    }

    /// Sleeps for `d`, or less if the run ends meanwhile.
    async fn pause(&self, d: Duration) {
        let mut over = self.over.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = over.wait_for(|o| *o) => {}
        }
    }
}

/// The wait before attempt `attempt + 1`: 100 ms doubled per attempt, at most 10 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(7)).min(10_000))
}

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Encoded size of an item inside an `EmbedRequest` (field tag, length, body).
fn framed_len(item: &Item) -> usize {
    let len = prost::Message::encoded_len(item);
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Reads a chunk's files into one message of at most `--max-message-bytes`. Items that cannot be read or can
/// never fit fail here, once, and are left out; when the message is full, the rest of the chunk goes back to
/// the head of the queue. Returns the message and the chunk of the items it carries (`None` when none is left).
fn to_message(shared: &Shared, chunk: Chunk) -> Option<(EmbedRequest, Chunk)> {
    let limit = shared.args.max_message_bytes;
    // What a message holds besides its items: the `normalize` flag.
    let room = limit.saturating_sub(2);
    let (attempts, mut size) = (chunk.attempts, 0usize);
    let mut items = Vec::new();
    let mut sent = Vec::new();
    let mut rest = chunk.items.into_iter();
    while let Some(w) = rest.next() {
        let s = &w.source;
        let image = match &s.image {
            None => None,
            Some(ImageRef::Url(u)) => Some(Image::ImageUrl(u.clone())),
            Some(ImageRef::Base64(b)) => Some(Image::ImageBase64(b.clone())),
            Some(ImageRef::Path(p)) => match load(p, room) {
                Ok(bytes) => Some(Image::ImageBytes(bytes)),
                Err(problem) => {
                    shared.fail(w.source.id, problem);
                    continue;
                }
            },
        };
        let item = Item { id: s.id.clone(), image, text: s.text.clone() };
        let len = framed_len(&item);
        if len > room {
            let message =
                format!("item is {len} bytes encoded, over the message limit of {limit} (--max-message-bytes)");
            shared.fail(w.source.id, Problem::new("RESOURCE_EXHAUSTED", client_reason::TOO_LARGE, message));
            continue;
        }
        if size + len > room && !items.is_empty() {
            // Full: this item and the ones after it make the next message (read again then).
            let left: Vec<Work> = std::iter::once(w).chain(rest).collect();
            shared.put_front(std::iter::once(Chunk::new(left, attempts)));
            break;
        }
        size += len;
        items.push(item);
        sent.push(w);
    }
    if sent.is_empty() {
        return None;
    }
    Some((
        EmbedRequest { items, normalize: shared.args.normalize },
        Chunk { items: sent, attempts, not_before: Instant::now() },
    ))
}

/// What to do about a failed call or a broken stream.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Worth sending again: a retryable server reason, or a transport failure with no reason.
    Retry,
    /// Caused by the message that failed (e.g. over the server's message limit): not retried.
    Permanent,
    /// Every call to this server would fail the same way (wrong API key, not a clipserve server): it is given up.
    Fatal,
}

fn verdict(status: &tonic::Status) -> Verdict {
    if let Some(reason) = status_reason(status) {
        match Reason::parse(&reason) {
            Some(Reason::Unauthenticated) => return Verdict::Fatal,
            Some(r) if r.retryable() => return Verdict::Retry,
            Some(_) => return Verdict::Permanent,
            None => {} // a reason this client does not know: judge by the code
        }
    }
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented => Verdict::Fatal,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::NotFound | Code::AlreadyExists => {
            Verdict::Permanent
        }
        // What a dropped connection or a reset stream looks like (UNAVAILABLE, UNKNOWN, INTERNAL, CANCELLED, ...).
        _ => Verdict::Retry,
    }
}

/// Whether an item error is worth another attempt: a retryable reason, or UNAVAILABLE with no reason.
fn item_retryable(e: &ItemError) -> bool {
    match Reason::parse(&e.reason) {
        Some(r) => r.retryable(),
        None => e.reason.is_empty() && e.code == Code::Unavailable as i32,
    }
}

/// How one stream ended.
enum Ending {
    /// Nothing is pending any more.
    Finished,
    /// The connection or the stream failed; what was in flight is retried.
    Broke(Problem),
    /// The server refused the oldest message in flight for good; the others are sent again.
    Refused(Problem),
    /// Every call to this server would fail this way.
    Fatal(Problem),
}

/// An error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Some errors repeat their cause in their own message.
        let cause_text = cause.to_string();
        if !s.contains(&cause_text) {
            s = format!("{s}: {cause_text}");
        }
        source = cause.source();
    }
    s
}

/// Drives one server: streams to it, reconnecting with backoff, until no work is left. Gives up on it (returning
/// the last problem) after `--retries` failed attempts in a row with nothing answered, or at once when every call
/// would fail.
async fn drive(server: String, shared: Arc<Shared>) -> Result<(), Problem> {
    let endpoint = Channel::from_shared(server.clone())
        .map_err(|e| Problem::new("INVALID_ARGUMENT", "", format!("invalid server address: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT);
    let mut failures = 0u32;
    while !shared.is_over() {
        let (ending, answered) = match endpoint.connect().await {
            Ok(channel) => session(channel, &shared).await,
            Err(e) => {
                (Ending::Broke(Problem::new("UNAVAILABLE", "", format!("cannot connect: {}", error_chain(&e)))), false)
            }
        };
        if answered {
            failures = 0;
        }
        match ending {
            Ending::Finished => {}
            Ending::Fatal(p) => {
                tracing::warn!(%server, "giving up on this server: {} {}: {}", p.code, p.reason, p.message);
                return Err(p);
            }
            Ending::Refused(p) => {
                tracing::warn!(%server, "a message was refused ({} {}: {}); its items are not retried", p.code, p.reason, p.message);
            }
            Ending::Broke(p) => {
                failures += 1;
                if failures >= shared.args.retries {
                    tracing::warn!(%server, "giving up on this server after {failures} failed attempts: {}", p.message);
                    return Err(p);
                }
                tracing::warn!(%server, "{} {}; retrying", p.code, p.message);
                shared.pause(backoff(failures)).await;
            }
        }
    }
    Ok(())
}

/// One stream on a connected channel: keeps up to `--window` messages in flight and writes what comes back.
/// Returns how it ended and whether any answer came; what it had in flight and unanswered is back in the queue
/// (or, for a refused message, in the errors file).
async fn session(channel: Channel, shared: &Arc<Shared>) -> (Ending, bool) {
    let mut client =
        EmbedderClient::new(channel).max_decoding_message_size(256 << 20).max_encoding_message_size(usize::MAX);
    let window = shared.args.window.max(1);
    let (tx, rx) = mpsc::channel::<EmbedRequest>(window);
    let in_flight: Arc<Mutex<InFlight>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(window));
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
                    if shared.is_over() {
                        break None;
                    }
                    // Wake up now and then: work comes back from other streams, or after its backoff.
                    let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
                };
                let Some(chunk) = chunk else { return };
                // From here to the push no await: a chunk taken is always either in flight or settled.
                let Some((message, sent)) = to_message(&shared, chunk) else { continue };
                in_flight.lock().unwrap().push_back(sent);
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
    let mut answered = false;
    let failed = |status: tonic::Status| {
        let p = Problem::from_status(&status);
        match verdict(&status) {
            Verdict::Retry => Ending::Broke(p),
            Verdict::Permanent => Ending::Refused(p),
            Verdict::Fatal => Ending::Fatal(p),
        }
    };
    let mut over = shared.over.subscribe();
    let ending = match client.embed_stream(request).await {
        Err(status) => failed(status),
        Ok(response) => {
            let mut answers = response.into_inner();
            loop {
                let next = tokio::select! {
                    next = answers.next() => next,
                    // Nothing is left to answer.
                    _ = over.wait_for(|o| *o) => break Ending::Finished,
                };
                match next {
                    Some(Ok(answer)) => {
                        answered = true;
                        slots.add_permits(1);
                        let Some(chunk) = in_flight.lock().unwrap().pop_front() else {
                            break Ending::Broke(Problem::new("INTERNAL", "", "an answer for no message"));
                        };
                        settle_answer(shared, chunk, answer);
                    }
                    Some(Err(status)) => break failed(status),
                    None if shared.is_over() => break Ending::Finished,
                    None => break Ending::Broke(Problem::new("UNAVAILABLE", "", "the stream ended early")),
                }
            }
        }
    };
    sender.abort();
    let _ = sender.await;
    let unanswered: Vec<Chunk> = in_flight.lock().unwrap().drain(..).collect();
    let ending = match ending {
        // A refusal with nothing in flight cannot be pinned on a message: it counts as a failed attempt.
        Ending::Refused(p) if unanswered.is_empty() => Ending::Broke(p),
        e => e,
    };
    match &ending {
        Ending::Finished => {}
        Ending::Fatal(_) => shared.put_front(unanswered.into_iter()),
        Ending::Broke(p) => {
            if !unanswered.is_empty() {
                tracing::warn!(messages = unanswered.len(), "stream broke with messages in flight; sending them again");
            }
            for mut chunk in unanswered {
                for w in &mut chunk.items {
                    w.last = Some(p.clone());
                }
                shared.retry(chunk);
            }
        }
        Ending::Refused(p) => {
            // Answers come in order, so the refusal is the oldest unanswered message's. Alone, its item fails; with
            // others, each is sent once more on its own to find which one it was. The messages after it did
            // nothing wrong: they go first, with no attempt counted.
            let mut chunks = unanswered.into_iter();
            let mut again = Vec::new();
            if let Some(first) = chunks.next() {
                if first.items.len() == 1 {
                    for w in first.items {
                        shared.fail(w.source.id, p.clone());
                    }
                } else {
                    again.extend(first.items.into_iter().map(|w| Chunk::new(vec![w], first.attempts)));
                }
            }
            again.extend(chunks);
            shared.put_front(again.into_iter());
        }
    }
    (ending, answered)
}

/// Writes one answer's embeddings and errors; retryable item errors go back to the queue as one chunk.
fn settle_answer(shared: &Shared, chunk: Chunk, answer: crate::pb::EmbedResponse) {
    let mut retry = Vec::new();
    let mut embeddings = answer.embeddings.into_iter();
    for mut w in chunk.items {
        // Matched by position (the server answers in order); the id written is the one sent.
        let Some(e) = embeddings.next() else {
            w.last = Some(Problem::new("INTERNAL", "", "the server's answer left this item out"));
            retry.push(w);
            continue;
        };
        match e.error {
            Some(err) if item_retryable(&err) => {
                w.last = Some(Problem::from_item(&err));
                retry.push(w);
            }
            Some(err) => shared.fail(w.source.id, Problem::from_item(&err)),
            None => shared.done(Record {
                id: w.source.id,
                image_features: (!e.image_features.is_empty()).then_some(e.image_features),
                text_features: (!e.text_features.is_empty()).then_some(e.text_features),
            }),
        }
    }
    if !retry.is_empty() {
        shared.retry(Chunk::new(retry, chunk.attempts));
    }
}

/// The name of a gRPC code, as the errors file writes it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
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
        args.batch > 0 && args.window > 0 && args.retries > 0 && args.max_message_bytes > 0,
        "--batch, --window, --retries, --max-message-bytes must be positive"
    );
    if args.format == Format::Npy {
        std::fs::create_dir_all(&args.output)?;
    }
    let (journal, errors) = (journal_path(&args), errors_path(&args));
    let Input { items, failed } = read_input(&args.input)?;
    let total = items.len() + failed.len();
    let mut seen = HashSet::new();
    if let Some(dup) = items.iter().map(|s| &s.id).chain(failed.iter().map(|(id, _)| id)).find(|id| !seen.insert(*id)) {
        anyhow::bail!("id {dup:?} appears twice in {}", args.input.display());
    }
    let mut skip = ids_in(&journal)?;
    skip.extend(ids_in(&errors)?);
    let todo: Vec<Source> = items.into_iter().filter(|s| !skip.contains(&s.id)).collect();
    let failed: Vec<(String, Problem)> = failed.into_iter().filter(|(id, _)| !skip.contains(id)).collect();
    eprintln!(
        "{total} items in {}; {} already done, {} to embed on {} server(s)",
        args.input.display(),
        total - todo.len() - failed.len(),
        todo.len() + failed.len(),
        args.servers.len()
    );

    let progress = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((todo.len() + failed.len()) as u64)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items  {per_sec}  ETA {eta}  {msg}")
            .expect("progress template"),
    );

    let (results_tx, mut results_rx) = mpsc::unbounded_channel();
    // Inputs that failed while being listed are written first, once.
    for (id, problem) in failed {
        let _ = results_tx.send(Outcome::Failed(Failure::new(id, problem)));
    }
    let pending = todo.len();
    let mut queue = VecDeque::new();
    let mut rest = todo;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(args.batch));
        let items = std::mem::replace(&mut rest, tail).into_iter().map(|source| Work { source, last: None });
        queue.push_back(Chunk::new(items.collect(), 0));
    }
    let shared = Arc::new(Shared {
        queue: Mutex::new(queue),
        more: Notify::new(),
        pending: AtomicUsize::new(pending),
        over: watch::Sender::new(pending == 0),
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
    let drivers: Vec<_> =
        args.servers.iter().map(|s| (s.clone(), tokio::spawn(drive(s.clone(), shared.clone())))).collect();
    let mut given_up = Vec::new();
    for (server, d) in drivers {
        if let Err(p) = d.await? {
            given_up.push(format!("{server} ({} {})", p.code, p.message));
        }
    }
    let unfinished = shared.pending.load(Ordering::SeqCst);
    drop(shared);
    let (ok, failed) = writer.await??;
    progress.finish();
    eprintln!("embedded {ok}, failed {failed} (see {}), written to {}", errors.display(), journal.display());
    anyhow::ensure!(
        unfinished == 0,
        "{unfinished} items were not embedded: every server was given up: {}; run the same command again to \
         resume",
        given_up.join("; ")
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn giving_up_on_an_unreachable_server_takes_under_a_minute_with_default_flags() {
        // A server given up after `retries` failed connections: each may take the connect timeout, with a backoff
        // between them.
        let retries = 8; // the default of --retries
        let waits: Duration = (1..retries).map(backoff).sum();
        assert!(waits + CONNECT_TIMEOUT * retries < Duration::from_secs(60), "{waits:?}");
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(30), Duration::from_secs(10));
    }

    #[test]
    fn only_retryable_reasons_and_transport_failures_are_retried() {
        use crate::error::Error;
        let status = |r: Reason| tonic::Status::from(Error::new(r, "m"));
        assert_eq!(verdict(&status(Reason::QueueFull)), Verdict::Retry);
        assert_eq!(verdict(&status(Reason::ShuttingDown)), Verdict::Retry);
        assert_eq!(verdict(&status(Reason::ImageTooLarge)), Verdict::Permanent);
        assert_eq!(verdict(&status(Reason::RequestTooLarge)), Verdict::Permanent);
        assert_eq!(verdict(&status(Reason::Unauthenticated)), Verdict::Fatal);
        // No reason: a transport failure, unless the code says the message itself was wrong.
        assert_eq!(verdict(&tonic::Status::unavailable("connection refused")), Verdict::Retry);
        assert_eq!(verdict(&tonic::Status::unknown("h2 protocol error")), Verdict::Retry);
        assert_eq!(verdict(&tonic::Status::internal("stream reset")), Verdict::Retry);
        assert_eq!(verdict(&tonic::Status::out_of_range("message length too large")), Verdict::Permanent);
        assert_eq!(verdict(&tonic::Status::unimplemented("no such service")), Verdict::Fatal);

        let item =
            |code: Code, reason: &str| ItemError { code: code as i32, message: "m".into(), reason: reason.into() };
        assert!(item_retryable(&item(Code::ResourceExhausted, "QUEUE_FULL")));
        assert!(item_retryable(&item(Code::Internal, "MODEL_FAILURE")));
        assert!(!item_retryable(&item(Code::ResourceExhausted, "IMAGE_TOO_LARGE")));
        assert!(!item_retryable(&item(Code::ResourceExhausted, "")));
        assert!(!item_retryable(&item(Code::InvalidArgument, "INVALID_IMAGE")));
        assert!(item_retryable(&item(Code::Unavailable, "")));
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clipserve-embed-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_folder_keeps_every_entry_named_like_an_image() {
        let dir = temp_dir("folder");
        std::fs::write(dir.join("a.png"), b"png").unwrap();
        std::fs::write(dir.join("notes.txt"), b"skipped").unwrap();
        std::os::unix::fs::symlink(dir.join("gone.png"), dir.join("dangling.png")).unwrap();
        std::os::unix::fs::symlink(dir.join("gone.txt"), dir.join("dangling.txt")).unwrap();
        std::os::unix::fs::symlink(dir.join("loop.jpg"), dir.join("loop.jpg")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("pipe.jpg").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b.JPG"), b"jpg").unwrap();

        let input = read_folder(&dir);
        let ids: Vec<&str> = input.items.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a.png", "dangling.png", "loop.jpg", "pipe.jpg", "sub/b.JPG"]);
        assert!(input.failed.is_empty());
        let load_of = |id: &str| {
            let Some(ImageRef::Path(p)) = &input.items.iter().find(|s| s.id == id).unwrap().image else { panic!() };
            load(p, 1 << 20)
        };
        assert_eq!(load_of("a.png").unwrap(), b"png");
        let e = load_of("dangling.png").unwrap_err();
        assert_eq!((e.code, e.reason.as_str()), ("NOT_FOUND", client_reason::NOT_FOUND));
        assert_eq!(load_of("loop.jpg").unwrap_err().reason, client_reason::UNREADABLE);
        assert_eq!(load_of("pipe.jpg").unwrap_err().reason, client_reason::NOT_A_FILE);
        let Some(ImageRef::Path(p)) = &input.items[0].image else { panic!() };
        assert_eq!(load(p, 2).unwrap_err().reason, client_reason::TOO_LARGE);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_jsonl_line_is_one_failure() {
        let dir = temp_dir("jsonl");
        let input = dir.join("in.jsonl");
        let mut text = b"{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"b\", \"image\": 5}\n{not json\n".to_vec();
        text.extend(b"\xff\xfe\n\n{\"text\": \"no id\"}\n");
        std::fs::write(&input, text).unwrap();
        let Input { items, failed } = read_input(&input).unwrap();
        assert_eq!(items.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a", "6"]);
        let failed: Vec<&str> = failed.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(failed, ["b", "in.jsonl:3", "in.jsonl:4"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
