//! `clipserve embed`: bulk embedding through `EmbedStream`, shared across one or more servers.
//!
//! Inputs ([`input`]): a folder of images (recursive), a text file of image paths or URLs (one per line), JSONL
//! with `id` / `image` (path, URL or base64) / `text`, webdataset `.tar` shards ([`webdataset`]: a path, a glob or
//! a brace range) and Parquet files ([`table`]). Inputs are read as a stream by one reader thread, a bounded
//! amount ahead of what the servers have answered, so memory does not grow with the input.
//!
//! The input is cut into units: one per tar shard, `--partition-size` rows of a Parquet file, or
//! `--partition-size` consecutive items of a folder or list. `--shard I/N` keeps every N-th unit starting at I,
//! so that N processes split a dataset with no coordination.
//!
//! Outputs ([`output`]): `--format clip-retrieval` writes one partition per unit (`img_emb/img_emb_N.npy`,
//! `text_emb/text_emb_N.npy`, `metadata/metadata_N.parquet`, `errors/errors_N.jsonl`), each under a temporary
//! name and renamed once complete; a rerun skips the complete ones. The small-job formats (`jsonl`, `npy`,
//! `parquet`) go through a JSONL journal that a rerun reads back to skip what is done.
//!
//! Every input ends in exactly one place: an output row or a line in the errors (id, code, reason, message).
//! Only what may succeed when sent again is retried ([`driver`]), with capped exponential backoff, on any
//! server: item errors and failed calls whose reason is retryable (QUEUE_FULL, NOT_READY, ...), and transport
//! failures that carry no server reason (connection refused, a broken stream). Everything else (IMAGE_TOO_LARGE,
//! INVALID_IMAGE, an unreadable file, ...) goes to the errors at once. A server that cannot be reached
//! `--retries` times in a row is given up; when every server is given up the run stops with an error. A
//! `--server` whose host is a name is resolved again every `--resolve-interval`, with one stream per address
//! ([`pool`]): a headless Service's pods as they come and go.

mod driver;
mod input;
mod npy;
mod output;
mod partition;
mod pool;
mod table;
mod webdataset;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::duration::parse_duration;

pub use pool::{system_resolver, Resolver};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line: {"id", "image_features"?, "text_features"?} (tiny jobs).
    Jsonl,
    /// A folder with image_embeddings.npy + image_ids.txt and text_embeddings.npy + text_ids.txt.
    Npy,
    /// A Parquet file with columns id (string), image_features and text_features (fixed-size lists of float32,
    /// null where the item had no such input) (small jobs).
    Parquet,
    /// clip-retrieval's layout, one partition per input unit: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy and
    /// metadata/metadata_N.parquet, rows aligned; resumable by partition (any size of job).
    ClipRetrieval,
}

/// Element type of the written embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// IEEE half precision (clip-retrieval's default: half the disk, about 3 decimal digits).
    Float16,
    /// IEEE single precision, as the server computes them.
    Float32,
}

/// `--shard I/N`: this process takes units I, I+N, I+2N, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's index, below `count`.
    pub index: u64,
    /// How many processes split the input.
    pub count: u64,
}

impl Shard {
    /// Whether unit `unit` is this process's.
    pub fn owns(&self, unit: u64) -> bool {
        unit % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("invalid shard {s:?}: expected I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// Flags of `clipserve embed`.
#[derive(Debug, Clone, Args)]
pub struct EmbedArgs {
    /// Server to send to (gRPC URL); repeat or comma-separate to share the work across replicas. A host that is a
    /// name is resolved again every --resolve-interval and gets one stream per address (a headless Service).
    #[arg(long = "server", required = true, value_delimiter = ',')]
    pub servers: Vec<String>,

    /// A folder of images (recursive), a .txt file of image paths or URLs, a .jsonl file of {"id", "image",
    /// "text"} objects, webdataset .tar shards (a path, a glob or a brace range such as
    /// `data/{00000..00099}.tar`) or .parquet files (a path, a glob or a brace range).
    #[arg(long)]
    pub input: PathBuf,

    /// Output: a .jsonl file (jsonl), a folder (npy, clip-retrieval), or a .parquet file (parquet).
    #[arg(long)]
    pub output: PathBuf,

    /// Output format.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,

    /// Element type of the embeddings written by npy and clip-retrieval [default: float16 for clip-retrieval,
    /// float32 otherwise].
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,

    /// Where items that failed are written (JSONL: id, code, reason, message); default: OUTPUT with
    /// `.errors.jsonl`, or the folder OUTPUT/errors (one errors_N.jsonl per partition) for clip-retrieval.
    #[arg(long)]
    pub errors: Option<PathBuf>,

    /// Parquet input: the image column: http(s) URLs, base64 (or data: URIs), bytes, or a struct with a `bytes`
    /// field (Hugging Face datasets) [default: url, img2dataset's name; optional unless given].
    #[arg(long)]
    pub image_column: Option<String>,

    /// Parquet input: the text column [default: caption; optional unless given].
    #[arg(long)]
    pub text_column: Option<String>,

    /// Parquet input: the id column [default: key; without one, ids are FILE:ROW].
    #[arg(long)]
    pub id_column: Option<String>,

    /// Take every N-th input unit starting at I (I/N, 0-based): N processes with I = 0..N-1 split the input with
    /// no coordination. Units are tar shards, or --partition-size items of other inputs.
    #[arg(long)]
    pub shard: Option<Shard>,

    /// Items per unit (and output partition) of a folder, list or JSONL input, and rows per unit of a Parquet
    /// file. Keep it the same across the runs and processes of one output.
    #[arg(long, default_value_t = 100_000)]
    pub partition_size: u64,

    /// Items per stream message.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,

    /// Messages in flight per stream (one stream per server address). The server works on up to its
    /// --stream-window (16) messages of a stream at once; --batch x --window items in flight per server keep
    /// its batches full.
    #[arg(long, default_value_t = 16)]
    pub window: usize,

    /// Largest stream message sent, in bytes (keep it within the server's --max-message-bytes); messages are
    /// cut short to fit, and an input that cannot fit alone goes to the errors unread.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_message_bytes: usize,

    /// Bytes of read inputs waiting to be sent, at most (besides what is in flight); the reader waits past it.
    #[arg(long, default_value_t = 16 << 20)]
    pub read_ahead_bytes: usize,

    /// Unit-length embeddings (what clip-retrieval's own inference writes).
    #[arg(long)]
    pub normalize: bool,

    /// Attempts per item when the failure is retryable, and failed connection attempts in a row before a server
    /// is given up.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,

    /// How often a --server name is resolved again, to follow the addresses behind it.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub resolve_interval: Duration,

    /// API key sent as `authorization: Bearer KEY`.
    #[arg(long, env = "CLIPSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// For https:// servers (a server started with --tls-cert): the CA certificate(s), PEM, that their
    /// certificates chain to. A server name resolved to addresses is checked against the name.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,

    /// Mutual TLS: the client certificate (PEM) to present, signed by the server's --tls-client-ca; needs
    /// --tls-key. The files are read again at each new connection, so a renewed certificate is used as it comes.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// No progress bar (for logs).
    #[arg(long)]
    pub no_progress: bool,
}

impl EmbedArgs {
    /// The element type written: --dtype, or the format's default.
    fn dtype(&self) -> Dtype {
        self.dtype.unwrap_or(if self.format == Format::ClipRetrieval { Dtype::Float16 } else { Dtype::Float32 })
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Items written to the output.
    pub embedded: u64,
    /// Items written to the errors.
    pub failed: u64,
    /// Items skipped because an earlier run wrote them (formats with a journal).
    pub skipped_items: u64,
    /// Partitions skipped because an earlier run completed them (clip-retrieval).
    pub skipped_partitions: u64,
    /// Partitions completed by this run (clip-retrieval).
    pub partitions: u64,
}

/// Runs `clipserve embed`.
pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(embed(args, system_resolver())).map(|_| ())
}

/// Runs `clipserve embed` with `resolver` for the server names; returns what it did.
pub async fn embed(args: EmbedArgs, resolver: Resolver) -> anyhow::Result<Summary> {
    check_args(&args)?;
    let plan = input::Plan::open(&args)?;
    let sink = output::open(&args)?;
    let skip = sink.skip()?;
    eprintln!("{}", plan.describe(&args, &skip));
    let progress = progress_bar(&args);

    // One reader thread, one writer thread, and a task per server sharing the work between them.
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(driver::Shared::new(args.clone(), events_tx));
    let writer = {
        let (shared, progress) = (shared.clone(), progress.clone());
        tokio::task::spawn_blocking(move || output::write_all(sink, events_rx, &shared, &progress))
    };
    let reader = spawn_reader(plan, skip, shared.clone());
    let given_up = run_servers(&args, &shared, &resolver).await?;

    // Every server is done: either nothing is left, or they were all given up and the reader must stop.
    shared.stop();
    let read = reader.await?;
    let unfinished = shared.pending.load(Ordering::SeqCst);
    let complete = unfinished == 0 && shared.read_all();
    shared.tell(driver::Event::Finish { complete: complete && read.is_ok() });
    drop(shared);
    let written = writer.await?;
    progress.finish_and_clear();
    let mut summary = written.context("writing the output")?;
    let skipped = read.context("reading the input")?;
    summary.skipped_items = skipped.items;
    summary.skipped_partitions = skipped.units;
    print_summary(&args, &summary);
    anyhow::ensure!(
        complete,
        "the run did not finish ({unfinished} items in flight, the input {}read to its end): every server was \
         given up: {}; run the same command again to resume",
        if skipped.complete { "" } else { "not " },
        given_up.join("; ")
    );
    Ok(summary)
}

/// Refuses flag values no run can use.
fn check_args(args: &EmbedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch > 0 && args.window > 0 && args.retries > 0 && args.max_message_bytes > 0 && args.partition_size > 0,
        "--batch, --window, --retries, --max-message-bytes, --partition-size must be positive"
    );
    anyhow::ensure!(
        !(args.format == Format::Parquet && args.dtype() == Dtype::Float16),
        "--format parquet writes float32 only; use --format clip-retrieval or npy for float16"
    );
    if args.servers.iter().any(|s| s.starts_with("https://")) {
        anyhow::ensure!(args.tls_ca.is_some(), "https:// servers need --tls-ca (the CA their certificates chain to)");
        driver::tls_config(args, None).map_err(|p| anyhow::anyhow!("{}", p.message))?;
    }
    Ok(())
}

/// The progress line (hidden with `--no-progress`).
fn progress_bar(args: &EmbedArgs) -> indicatif::ProgressBar {
    let progress =
        if args.no_progress { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::no_length() };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} items  {per_sec}  {elapsed}  {msg}")
            .expect("progress template"),
    );
    progress
}

/// Reads the input on its own thread, a bounded amount ahead of the servers; tells `shared` when it is done.
fn spawn_reader(
    plan: input::Plan,
    skip: input::Skip,
    shared: Arc<driver::Shared>,
) -> tokio::task::JoinHandle<anyhow::Result<input::Skipped>> {
    tokio::task::spawn_blocking(move || {
        let result = input::read(plan, skip, &shared);
        match &result {
            Ok(skipped) => shared.finish_reading(skipped.complete),
            Err(_) => shared.abort(),
        }
        result
    })
}

/// Streams to every `--server` until no work is left; returns the servers given up, with why.
async fn run_servers(
    args: &EmbedArgs,
    shared: &Arc<driver::Shared>,
    resolver: &Resolver,
) -> anyhow::Result<Vec<String>> {
    let servers: Vec<_> = args
        .servers
        .iter()
        .map(|s| (s.clone(), tokio::spawn(pool::serve(s.clone(), shared.clone(), resolver.clone()))))
        .collect();
    let mut given_up = Vec::new();
    for (server, task) in servers {
        if let Err(p) = task.await? {
            given_up.push(format!("{server} ({} {})", p.code, p.message));
        }
    }
    Ok(given_up)
}

/// The closing line: what was embedded, failed and skipped, and where it is.
fn print_summary(args: &EmbedArgs, summary: &Summary) {
    eprintln!(
        "embedded {}, failed {}, {} already done{}; output in {}, errors in {}",
        summary.embedded,
        summary.failed,
        if args.format == Format::ClipRetrieval {
            format!("{} partitions", summary.skipped_partitions)
        } else {
            format!("{} items", summary.skipped_items)
        },
        if args.format == Format::ClipRetrieval {
            format!(", {} partitions written", summary.partitions)
        } else {
            String::new()
        },
        args.output.display(),
        output::errors_path(args).display(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_split_units() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!((0..9).filter(|u| s.owns(*u)).collect::<Vec<_>>(), [1, 4, 7]);
        for bad in ["3/3", "1", "-1/2", "a/b", "1/0", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
