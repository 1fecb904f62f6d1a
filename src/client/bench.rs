//! `clipserve bench`: a gRPC load generator (Embed or EmbedStream, images or texts), and a raw-model mode that
//! times the TorchScript forward alone. Prints throughput and latency percentiles; optionally writes JSON.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::duration::parse_duration;
use crate::pb::{embedder_client::EmbedderClient, item::Image, EmbedRequest, Item};

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Image,
    Text,
}

/// Flags of `clipserve bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Server to load (gRPC URL).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// Images or texts.
    #[arg(long, value_enum, default_value = "image")]
    pub kind: Kind,

    /// Image file sent as every image item (required for --kind image).
    #[arg(long)]
    pub image: Option<PathBuf>,

    /// Text sent as every text item; a number below 1000 is appended so texts differ.
    #[arg(long, default_value = "a photo of a cat")]
    pub text: String,

    /// Calls (or streams) in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,

    /// Items per request message.
    #[arg(long, default_value_t = 1)]
    pub items: usize,

    /// Use EmbedStream: each of the --concurrency streams keeps --window messages in flight.
    #[arg(long)]
    pub stream: bool,

    /// Messages in flight per stream (with --stream).
    #[arg(long, default_value_t = 8)]
    pub window: usize,

    /// How long to measure (after the warm-up); ignored when --requests is given.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Stop after this many requests in all, instead of after --duration.
    #[arg(long)]
    pub requests: Option<u64>,

    /// Load sent before measuring starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Time the TorchScript forward of this model directory in-process instead of loading a server.
    #[arg(long)]
    pub raw_model: Option<PathBuf>,

    /// Batch size for --raw-model.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,

    /// Device for --raw-model (cpu, cuda, cuda:N).
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Tokens per text for --raw-model (start and end tokens included).
    #[arg(long, default_value_t = 8)]
    pub text_tokens: usize,

    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub mode: String,
    pub kind: Kind,
    pub concurrency: usize,
    pub items_per_request: usize,
    pub seconds: f64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub items_per_second: f64,
    pub requests_per_second: f64,
    pub latency_ms: Latency,
    pub errors: Vec<String>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    pub max: f64,
}

impl Latency {
    fn from_samples(mut samples: Vec<Duration>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let pick = |q: f64| ms(samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]);
        Latency {
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
            mean: samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64,
            max: ms(*samples.last().unwrap()),
        }
    }
}

/// Runs `clipserve bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = match &args.raw_model {
        Some(dir) => raw_model(&args, dir)?,
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(load(&args))?,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_report(r: &BenchReport) {
    println!(
        "{} {:?}: concurrency {}, {} item(s) per request, {:.1}s",
        r.mode, r.kind, r.concurrency, r.items_per_request, r.seconds
    );
    println!("requests: {} ok, {} failed", r.requests_ok, r.requests_failed);
    println!("throughput: {:.1} items/s, {:.1} requests/s", r.items_per_second, r.requests_per_second);
    let l = &r.latency_ms;
    println!("latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  mean {:.2}  max {:.2}", l.p50, l.p90, l.p99, l.mean, l.max);
    for e in r.errors.iter().take(5) {
        println!("error: {e}");
    }
}

fn make_items(args: &BenchArgs, image: &Option<Arc<Vec<u8>>>, counter: u64) -> Vec<Item> {
    (0..args.items)
        .map(|i| match args.kind {
            Kind::Image => Item {
                id: i.to_string(),
                image: Some(Image::ImageBytes(image.as_ref().expect("image").as_ref().clone())),
                text: None,
            },
            Kind::Text => Item {
                id: i.to_string(),
                image: None,
                text: Some(format!("{} {}", args.text, (counter + i as u64) % 1000)),
            },
        })
        .collect()
}

/// Shared counters of a load run.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    ok: u64,
    failed: u64,
    errors: Vec<String>,
}

async fn load(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(args.concurrency > 0 && args.items > 0, "--concurrency and --items must be positive");
    let image = read_image(args)?;
    let channel = Channel::from_shared(args.server.clone())?.connect().await.context("connecting")?;
    let client = EmbedderClient::new(channel).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20);
    let started = Instant::now();
    let run = Arc::new(Run {
        args: args.clone(),
        image,
        tally: Default::default(),
        // With --requests every answer counts; with --duration only those after --warmup.
        measuring: AtomicBool::new(args.requests.is_some()),
        sent: AtomicU64::new(0),
        end: started + args.warmup + args.duration,
    });
    if args.requests.is_none() {
        let run = run.clone();
        tokio::spawn(async move {
            tokio::time::sleep(run.args.warmup).await;
            run.measuring.store(true, Ordering::SeqCst);
        });
    }
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|worker| {
            let (client, run) = (client.clone(), run.clone());
            tokio::spawn(async move {
                if run.args.stream {
                    stream_load(client, run, worker).await
                } else {
                    unary_load(client, run, worker).await
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    Ok(run.report(started))
}

/// The image sent by `--kind image`.
fn read_image(args: &BenchArgs) -> anyhow::Result<Option<Arc<Vec<u8>>>> {
    Ok(match args.kind {
        Kind::Image => {
            let path = args.image.as_ref().context("--kind image needs --image FILE")?;
            Some(Arc::new(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?))
        }
        Kind::Text => None,
    })
}

/// What the load tasks of a run share.
struct Run {
    args: BenchArgs,
    image: Option<Arc<Vec<u8>>>,
    tally: std::sync::Mutex<Tally>,
    /// False during the warm-up: answers are not counted.
    measuring: AtomicBool,
    /// Requests started, for `--requests`.
    sent: AtomicU64,
    /// When `--duration` ends (after the warm-up).
    end: Instant,
}

impl Run {
    /// True while another request should go out: fewer than `--requests` sent, or `--duration` not over.
    fn keep_going(&self) -> bool {
        match self.args.requests {
            Some(n) => self.sent.fetch_add(1, Ordering::SeqCst) < n,
            None => Instant::now() < self.end,
        }
    }

    /// The items of `worker`'s `n`-th request.
    fn items(&self, worker: usize, n: u64) -> Vec<Item> {
        make_items(&self.args, &self.image, worker as u64 * 1_000_000 + n)
    }

    /// Counts one answer (sent at `t0`) once the warm-up is over.
    fn record(&self, t0: Instant, outcome: Result<(), String>) {
        if !self.measuring.load(Ordering::SeqCst) {
            return;
        }
        let mut t = self.tally.lock().unwrap();
        match outcome {
            Ok(()) => {
                t.ok += 1;
                t.latencies.push(t0.elapsed());
            }
            Err(e) => {
                t.failed += 1;
                if t.errors.len() < 20 {
                    t.errors.push(e);
                }
            }
        }
    }

    /// The report of the finished run.
    fn report(&self, started: Instant) -> BenchReport {
        let args = &self.args;
        let seconds = match args.requests {
            Some(_) => started.elapsed().as_secs_f64(),
            None => (started.elapsed().saturating_sub(args.warmup)).as_secs_f64(),
        };
        let t = std::mem::take(&mut *self.tally.lock().unwrap());
        BenchReport {
            mode: if args.stream { "grpc-stream".into() } else { "grpc-unary".into() },
            kind: args.kind,
            concurrency: args.concurrency,
            items_per_request: args.items,
            seconds,
            requests_ok: t.ok,
            requests_failed: t.failed,
            items_per_second: t.ok as f64 * args.items as f64 / seconds,
            requests_per_second: t.ok as f64 / seconds,
            latency_ms: Latency::from_samples(t.latencies),
            errors: t.errors,
        }
    }
}

/// A status as the report lists it.
fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// One load task on `Embed`: a call at a time.
async fn unary_load(mut client: EmbedderClient<Channel>, run: Arc<Run>, worker: usize) {
    let mut n = 0u64;
    while run.keep_going() {
        n += 1;
        let items = run.items(worker, n);
        let t0 = Instant::now();
        let r = client.embed(EmbedRequest { items, normalize: false }).await;
        run.record(t0, r.map(|_| ()).map_err(|s| status_text(&s)));
    }
}

/// One load task on `EmbedStream`: a bounded window of messages in flight; answers come back in order.
async fn stream_load(mut client: EmbedderClient<Channel>, run: Arc<Run>, worker: usize) {
    let window = run.args.window.max(1);
    let (tx, rx) = mpsc::channel::<EmbedRequest>(window);
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Instant>();
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let producer = tokio::spawn(produce(run.clone(), worker, permits.clone(), tx, sent_tx));
    match client.embed_stream(ReceiverStream::new(rx)).await {
        Ok(response) => {
            let mut answers = response.into_inner();
            while let Some(answer) = answers.next().await {
                let t0 = sent_rx.recv().await.unwrap_or_else(Instant::now);
                permits.add_permits(1);
                let outcome = match answer {
                    Ok(r) => match r.embeddings.iter().find_map(|e| e.error.as_ref()) {
                        Some(e) => Err(format!("item error {}: {}", e.code, e.message)),
                        None => Ok(()),
                    },
                    Err(s) => Err(status_text(&s)),
                };
                run.record(t0, outcome);
            }
        }
        Err(s) => run.record(Instant::now(), Err(status_text(&s))),
    }
    producer.abort();
}

/// Sends a stream's messages while the run goes on, each once a window slot is free, noting when it was sent.
async fn produce(
    run: Arc<Run>,
    worker: usize,
    slots: Arc<tokio::sync::Semaphore>,
    tx: mpsc::Sender<EmbedRequest>,
    sent_tx: mpsc::UnboundedSender<Instant>,
) {
    let mut n = 0u64;
    while run.keep_going() {
        let permit = slots.clone().acquire_owned().await.unwrap();
        permit.forget();
        n += 1;
        let items = run.items(worker, n);
        let _ = sent_tx.send(Instant::now());
        if tx.send(EmbedRequest { items, normalize: false }).await.is_err() {
            break;
        }
    }
}

/// Times the TorchScript forward alone, in-process, at a fixed batch size.
fn raw_model(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<BenchReport> {
    use crate::model::{device, Backend, Manifest, TorchBackend};
    let manifest = Manifest::load(dir)?;
    let dev = *device::parse_devices(&args.device)?.first().context("no device")?;
    let _no_grad = tch::no_grad_guard();
    let mut backend = TorchBackend::load(dir, &manifest, dev, dev.is_cuda())?;
    let s = manifest.image_size as usize;
    let pixels: Vec<Vec<f32>> = (0..args.batch).map(|i| vec![(i as f32 * 0.01).sin(); 3 * s * s]).collect();
    let texts: Vec<Vec<i64>> = (0..args.batch)
        .map(|i| {
            let mut t = vec![49406];
            t.extend((0..args.text_tokens.saturating_sub(2)).map(|j| 320 + ((i + j) % 1000) as i64));
            t.push(49407);
            t
        })
        .collect();
    let mut step = || -> anyhow::Result<()> {
        match args.kind {
            Kind::Image => backend.encode_images(&pixels.iter().map(Vec::as_slice).collect::<Vec<_>>()).map(|_| ()),
            Kind::Text => backend.encode_texts(&texts.iter().map(Vec::as_slice).collect::<Vec<_>>()).map(|_| ()),
        }
    };
    let warm_end = Instant::now() + args.warmup;
    step()?;
    while Instant::now() < warm_end {
        step()?;
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    let iterations = args.requests;
    loop {
        let t0 = Instant::now();
        step()?;
        latencies.push(t0.elapsed());
        let done = match iterations {
            Some(n) => latencies.len() as u64 >= n,
            None => start.elapsed() >= args.duration,
        };
        if done {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let n = latencies.len() as u64;
    Ok(BenchReport {
        mode: format!("raw-forward {}", device::device_name(dev)),
        kind: args.kind,
        concurrency: 1,
        items_per_request: args.batch,
        seconds,
        requests_ok: n,
        requests_failed: 0,
        items_per_second: n as f64 * args.batch as f64 / seconds,
        requests_per_second: n as f64 / seconds,
        latency_ms: Latency::from_samples(latencies),
        errors: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::from_samples(samples);
        assert_eq!((l.p50, l.p90, l.p99, l.max), (50.0, 90.0, 99.0, 100.0));
        assert!((l.mean - 50.5).abs() < 1e-9);
    }
}
