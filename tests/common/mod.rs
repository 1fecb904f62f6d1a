//! Shared test support: the reference fixtures written by dev/make_test_fixtures.py, and a real
//! `clipserve serve` process on port 0.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clipserve::pb::embedder_client::EmbedderClient;
use serde_json::Value;
use tonic::transport::Channel;

/// Folder of the reference data (`CLIPSERVE_TEST_FIXTURES`, default `target/test-fixtures`).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("CLIPSERVE_TEST_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-fixtures"))
}

/// The parsed `fixtures.json`. Missing fixtures stop the test binary with one line naming the command that
/// prepares them (see [`missing_fixtures`]).
pub fn fixtures() -> Value {
    let path = fixtures_dir().join("fixtures.json");
    let Ok(text) = std::fs::read_to_string(&path) else { missing_fixtures(&path) };
    serde_json::from_str(&text).expect("fixtures.json")
}

/// Exits the test binary, saying in one line which command prepares what is missing. Every test of the binary
/// needs the same data, so one line says it better than a panic per test.
pub fn missing_fixtures(path: &Path) -> ! {
    use std::io::Write;
    // Straight to the process's stderr: the test harness captures eprintln!, and would drop it on exit.
    let _ = writeln!(
        std::io::stderr(),
        "{} is missing: the tests need the exported test models and reference data; run dev/test.sh (it prepares \
         them, then runs cargo test with the same arguments)",
        path.display()
    );
    std::process::exit(2)
}

/// Waits up to `timeout` for `condition` to hold, checking every 20 ms; panics naming `what` if it never does.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "waited {timeout:?} in vain until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Model directory of a fixture model (`tiny` or `vit-b32`).
pub fn model_dir(name: &str) -> PathBuf {
    let f = fixtures();
    let dir = f["models"][name]["dir"].as_str().unwrap_or_else(|| panic!("no fixture model {name}"));
    PathBuf::from(dir)
}

/// Bytes of a fixture image.
pub fn image_bytes(file: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join("images").join(file)).expect("fixture image")
}

/// A JSON array of arrays of numbers as vectors.
pub fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|row| row.as_array().expect("row").iter().map(|x| x.as_f64().expect("number") as f32).collect())
        .collect()
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The value of `sample` in Prometheus text, 0 when absent. Labels are matched as a set, in any order.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    let (name, labels) = split_sample(sample);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(s, _)| split_sample(s) == (name, labels.clone()))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0.0)
}

fn split_sample(s: &str) -> (&str, Vec<&str>) {
    match s.split_once('{') {
        Some((name, rest)) => {
            let mut labels: Vec<&str> = rest.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect();
            labels.sort_unstable();
            (name, labels)
        }
        None => (s, Vec::new()),
    }
}

/// Equal up to the float noise of running in a different batch: max abs difference < 1e-4 and cosine > 0.99999
/// (two empty vectors are equal).
pub fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if a.is_empty() {
        return;
    }
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4 && cosine(a, b) > 0.99999, "{what}: max abs difference {diff}");
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces): utime and stime are the
    // 12th and 13th of them.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A `clipserve serve` child process, killed on drop.
pub struct TestServer {
    child: Child,
    pub grpc_addr: String,
    pub http_addr: String,
    /// The plaintext health listener's address, when the server was started with `--health-addr`.
    pub health_addr: Option<String>,
    pub log: mpsc::Receiver<String>,
    /// Lines printed up to and including the `listening` line.
    pub early_log: Vec<String>,
}

impl TestServer {
    /// Starts the server on `model` (CPU, port 0) with extra flags, and waits until health says SERVING (gRPC
    /// health; with `--health-addr`, which servers with TLS need here, `/ready` on the health listener).
    pub async fn start(model: &Path, extra: &[&str]) -> TestServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_clipserve"))
            .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--device", "cpu", "--model"])
            .arg(model)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting clipserve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                if tx.send(line).is_err() {
                    // keep draining so the server never blocks on a full pipe
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut early_log = Vec::new();
        let (grpc_addr, http_addr, health_addr) = loop {
            let line = rx.recv_timeout(Duration::from_secs(60)).expect("server printed no `listening` line");
            early_log.push(line.clone());
            if let Some(rest) = line.strip_prefix("listening ") {
                let field = |key: &str| {
                    rest.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(key))
                        .unwrap_or_else(|| panic!("{key} on the listening line"))
                        .to_string()
                };
                let health = rest.split_whitespace().find_map(|kv| kv.strip_prefix("health=")).map(str::to_string);
                break (field("grpc="), field("http="), health);
            }
            assert!(std::time::Instant::now() < deadline, "server did not start");
        };
        let server = TestServer { child, grpc_addr, http_addr, health_addr, log: rx, early_log };
        server.wait_serving(Duration::from_secs(120)).await;
        server
    }

    /// `http://HOST:PORT` of the HTTP listener.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The Prometheus text of `GET /metrics` (from the health listener when there is one).
    pub async fn metrics(&self) -> String {
        let base = match &self.health_addr {
            Some(health) => format!("http://{health}"),
            None => self.http_url(),
        };
        reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap()
    }

    /// The value of one sample (`name{labels}` exactly as rendered, or a bare name), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.expect("connecting")
    }

    pub async fn client(&self) -> EmbedderClient<Channel> {
        EmbedderClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Polls grpc.health.v1 for `clipserve.v1.Embedder` until SERVING.
    pub async fn wait_serving(&self, timeout: Duration) {
        use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(health) = &self.health_addr {
            loop {
                if let Ok(r) = reqwest::get(format!("http://{health}/ready")).await {
                    if r.status() == 200 {
                        return;
                    }
                }
                assert!(tokio::time::Instant::now() < deadline, "server never became ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        loop {
            if let Ok(ch) = Channel::from_shared(self.url()).unwrap().connect().await {
                let mut h = HealthClient::new(ch);
                let req = HealthCheckRequest { service: "clipserve.v1.Embedder".into() };
                if let Ok(r) = h.check(req).await {
                    if r.into_inner().status == ServingStatus::Serving as i32 {
                        return;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "server never became SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits up to `timeout` for the server to exit; panics if it does not.
    pub fn wait_exit(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the server") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the server did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("waiting for the server");
        std::mem::forget(self);
        status
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Samples a process's resident memory every few milliseconds until [`RssPeak::peak_mib`]; keeps the peak.
pub struct RssPeak {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    pub fn start(pid: u32) -> Self {
        let (peak_kib, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak_kib.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max((rss_mib(pid) * 1024.0) as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        RssPeak { peak_kib, stop, thread: Some(thread) }
    }

    pub fn peak_mib(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// A finished command's status and output, for assertion messages.
pub fn report(out: &std::process::Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
