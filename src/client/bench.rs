//! `clipserve bench`: a gRPC load generator (Embed or EmbedStream, images or texts), a raw-model mode that
//! times the TorchScript forward alone, and a preprocessing mode that times decoding and preprocessing alone on
//! one thread. Prints throughput and latency percentiles (or per-stage times); optionally writes JSON.

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
use crate::inputs::image::{ImagePreprocessor, PreprocessMode, StageTimes};
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

    /// Time the image preprocessing alone (decode, resize, normalise: encoded bytes to the model's input tensor)
    /// on these images, in this process, on one thread, in each mode of --preprocess-mode; no server, no model.
    /// Prints images per second per core (per second of CPU time the process used, so that other load on the
    /// machine matters less; wall-clock rates too) and the time per stage. --duration is per image and mode.
    #[arg(long, num_args = 1.., value_name = "IMAGE")]
    pub preprocess: Vec<PathBuf>,

    /// Modes timed by --preprocess (comma-separated): exact, fast.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "exact,fast")]
    pub preprocess_mode: Vec<PreprocessMode>,

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
    if !args.preprocess.is_empty() {
        let report = preprocess(&args)?;
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
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

/// What `--preprocess` measured for one image in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct PreprocessResult {
    pub image: String,
    pub bytes: usize,
    pub mode: PreprocessMode,
    pub images: u64,
    /// CPU time the process used for them.
    pub cpu_seconds: f64,
    /// Wall-clock time they took.
    pub seconds: f64,
    /// Images per second of CPU time: the rate of one core.
    pub images_per_second: f64,
    /// Images per second of wall-clock time.
    pub images_per_wall_second: f64,
    /// CPU milliseconds per image.
    pub ms_per_image: f64,
    /// CPU milliseconds per image in each stage: their shares timed in separate runs.
    pub stages_ms: Stages,
}

/// Milliseconds per image per stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    pub decode: f64,
    pub resize: f64,
    pub normalize: f64,
}

/// What `--preprocess` measured.
#[derive(Debug, Clone, Serialize)]
pub struct PreprocessReport {
    pub threads: usize,
    pub results: Vec<PreprocessResult>,
    /// Per mode: the geometric mean of images per second over the images.
    pub geometric_mean: Vec<(PreprocessMode, f64)>,
}

/// Rounds each (image, mode) is measured in, interleaved so that a noisy machine affects every mode alike.
const PREPROCESS_ROUNDS: u32 = 5;

/// Times decode + preprocessing of each image in each mode on this thread.
fn preprocess(args: &BenchArgs) -> anyhow::Result<PreprocessReport> {
    anyhow::ensure!(!args.preprocess_mode.is_empty(), "--preprocess-mode needs at least one mode");
    // CLIP ViT-B/32's input (the default model's manifest) and the server's default limits.
    #[allow(clippy::excessive_precision)]
    let pre = ImagePreprocessor {
        size: 224,
        mean: [0.48145466, 0.4578275, 0.40821073],
        std: [0.26862954, 0.26130258, 0.27577711],
        max_bytes: 20 << 20,
        max_pixels: 40_000_000,
        max_jpeg_scans: 100,
    };
    let images: Vec<(String, Vec<u8>)> = args
        .preprocess
        .iter()
        .map(|p| Ok((p.display().to_string(), std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)))
        .collect::<anyhow::Result<_>>()?;
    let modes = &args.preprocess_mode;
    let round = args.duration.max(Duration::from_millis(100)) / PREPROCESS_ROUNDS;
    let mut results = Vec::new();
    println!("preprocessing on one thread, {} per image and mode ({PREPROCESS_ROUNDS} interleaved rounds)", {
        let d = round * PREPROCESS_ROUNDS;
        format!("{:.1}s", d.as_secs_f64())
    });
    for (name, bytes) in &images {
        let mut counts = vec![(0u64, Duration::ZERO, Duration::ZERO); modes.len()];
        let mut stages = vec![(0u64, StageTimes::default()); modes.len()];
        for &mode in modes {
            // Warm-up, and the input's errors surface here.
            pre.preprocess_mode_until(bytes, mode, &crate::inputs::image::never_stop)
                .map_err(|e| anyhow::anyhow!("{name}: {}", e.message()))?;
        }
        for _ in 0..PREPROCESS_ROUNDS {
            for (i, &mode) in modes.iter().enumerate() {
                let (start, cpu) = (Instant::now(), process_cpu_time());
                let mut n = 0u64;
                while start.elapsed() < round * 3 / 4 || n == 0 {
                    let t = pre.preprocess_mode_until(bytes, mode, &crate::inputs::image::never_stop);
                    std::hint::black_box(t.map_err(|e| anyhow::anyhow!("{name}: {}", e.message()))?);
                    n += 1;
                }
                counts[i].0 += n;
                counts[i].1 += process_cpu_time().saturating_sub(cpu);
                counts[i].2 += start.elapsed();
                let start = Instant::now();
                while start.elapsed() < round / 4 || stages[i].0 == 0 {
                    let (t, times) =
                        pre.preprocess_timed(bytes, mode).map_err(|e| anyhow::anyhow!("{name}: {}", e.message()))?;
                    std::hint::black_box(t);
                    stages[i].0 += 1;
                    stages[i].1 += times;
                }
            }
        }
        for (i, &mode) in modes.iter().enumerate() {
            let (n, cpu, wall) = counts[i];
            let (_, t) = stages[i];
            let cpu = cpu.max(Duration::from_nanos(1)).as_secs_f64();
            // The stages' shares come from wall-clock timers around each stage; they are scaled to the CPU time
            // per image, so that time the process spent preempted is not counted in any stage.
            let staged = (t.decode + t.resize + t.normalize).as_secs_f64().max(1e-12);
            let per = |d: Duration| cpu * 1e3 / n as f64 * d.as_secs_f64() / staged;
            let r = PreprocessResult {
                image: name.clone(),
                bytes: bytes.len(),
                mode,
                images: n,
                cpu_seconds: cpu,
                seconds: wall.as_secs_f64(),
                images_per_second: n as f64 / cpu,
                images_per_wall_second: n as f64 / wall.as_secs_f64(),
                ms_per_image: cpu * 1e3 / n as f64,
                stages_ms: Stages { decode: per(t.decode), resize: per(t.resize), normalize: per(t.normalize) },
            };
            println!(
                "{} ({} KB) {}: {:.1} img/s per core ({:.1} wall), {:.2} ms/img (decode {:.2} ms, resize {:.2} ms, \
                 normalise {:.3} ms)",
                r.image,
                r.bytes / 1000,
                mode.name(),
                r.images_per_second,
                r.images_per_wall_second,
                r.ms_per_image,
                r.stages_ms.decode,
                r.stages_ms.resize,
                r.stages_ms.normalize
            );
            results.push(r);
        }
    }
    let geometric_mean: Vec<(PreprocessMode, f64)> = modes
        .iter()
        .map(|&mode| {
            let rates: Vec<f64> = results.iter().filter(|r| r.mode == mode).map(|r| r.images_per_second).collect();
            (mode, (rates.iter().map(|r| r.ln()).sum::<f64>() / rates.len() as f64).exp())
        })
        .collect();
    for (mode, g) in &geometric_mean {
        println!("{}: geometric mean {:.1} img/s per core over {} image(s)", mode.name(), g, images.len());
    }
    Ok(PreprocessReport { threads: 1, results, geometric_mean })
}

/// CPU time this process has used (all its threads).
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
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
