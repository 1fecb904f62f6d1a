//! The HTTP gateway under hostile clients, over loopback: bodies over the item, text and byte limits are refused
//! while they are read and parsed, with bounded time and memory, and bodies wait for the memory budget. Every wait
//! is bounded, and normal calls made during the attacks are timed.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// Samples a process's resident memory every few milliseconds until dropped; keeps the peak.
struct RssPeak {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    fn start(pid: u32) -> Self {
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

    fn peak_mib(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// Waits up to `within` for the server's memory to come back under `limit` MiB; the last reading.
async fn settle_rss(pid: u32, limit: f64, within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let rss = rss_mib(pid);
        if rss <= limit || Instant::now() >= deadline {
            return rss;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const ONE_ROW: &str = r#"{"input_data":{"columns":["image","text"],"data":[["","a photo of a cat"]]}}"#;

/// A normal /score call: its status and how long it took.
async fn normal_call(server: &TestServer) -> (u16, Duration) {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/score", server.http_url()))
        .header("content-type", "application/json")
        .body(ONE_ROW)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("normal call");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    if status == 200 {
        assert_eq!(body[0]["text_features"].as_array().unwrap().len(), 512);
    }
    (status, started.elapsed())
}

async fn post_body(server: &TestServer, body: Vec<u8>) -> (u16, Value, Duration) {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/score", server.http_url()))
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")), started.elapsed())
}

/// `{"input_data":{"columns":["text"],"data":[["a"],["a"],...]}}` of about `bytes` bytes.
fn tiny_rows(bytes: usize) -> Vec<u8> {
    let mut body = br#"{"input_data":{"columns":["text"],"data":["#.to_vec();
    let rows = bytes / 6;
    body.reserve(rows * 6 + 8);
    for _ in 0..rows - 1 {
        body.extend_from_slice(br#"["a"],"#);
    }
    body.extend_from_slice(br#"["a"]]}}"#);
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_60_mb_body_of_tiny_rows_is_refused_early_in_bounded_memory() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let pid = server.pid();
    assert_eq!(normal_call(&server).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_mib(pid);
    let body = tiny_rows(60 << 20);

    let peak = RssPeak::start(pid);
    let attack = {
        let body = body.clone();
        let url = server.http_url();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = reqwest::Client::new().post(format!("{url}/score")).body(body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap(), started.elapsed())
        })
    };
    // A normal call made while the body is on its way.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (normal_status, normal_latency) = normal_call(&server).await;
    let (status, answer, elapsed) = attack.await.unwrap();
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["reason"], "TOO_MANY_ITEMS", "{answer}");
    assert!(elapsed < Duration::from_secs(3), "the 60 MB body took {elapsed:?}");
    assert_eq!(normal_status, 200);
    assert!(normal_latency < Duration::from_secs(3), "a normal call during the attack took {normal_latency:?}");

    // Four more at once.
    let started = Instant::now();
    let answers = futures::future::join_all((0..4).map(|_| post_body(&server, body.clone()))).await;
    let four = started.elapsed();
    assert!(answers.iter().all(|(s, a, _)| *s == 413 && a["reason"] == "TOO_MANY_ITEMS"), "{answers:?}");
    let peak = peak.peak_mib();
    let after = settle_rss(pid, baseline + 64.0, Duration::from_secs(5)).await;
    eprintln!(
        "60 MB of tiny rows: 413 in {elapsed:?} (4 at once: {four:?}); RSS baseline {baseline:.0} MiB, peak \
         {peak:.0} MiB, after {after:.0} MiB; a normal call during it took {normal_latency:?}"
    );
    // Five bodies of 60 MB arrived, up to four of them at once: their bytes, not millions of parsed values.
    assert!(peak - baseline < 600.0, "memory grew from {baseline:.0} to {peak:.0} MiB");
    assert!(after - baseline < 64.0, "memory stayed at {after:.0} MiB after the attack (baseline {baseline:.0} MiB)");
}

#[tokio::test(flavor = "multi_thread")]
async fn texts_bodies_and_chunked_streams_over_the_limits_are_refused_while_they_arrive() {
    let server =
        TestServer::start(&model_dir("tiny"), &["--max-request-bytes", "1000000", "--max-text-chars", "100"]).await;
    // A long text names its row.
    let long =
        format!(r#"{{"input_data":{{"columns":["image","text"],"data":[["","ok"],["","{}"]]}}}}"#, "é".repeat(101));
    let (status, answer, _) = post_body(&server, long.into_bytes()).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["reason"], "TEXT_TOO_LONG");
    assert!(answer["error"].as_str().unwrap().starts_with("row 1"), "{answer}");

    // A declared length over the limit is answered before any of the body is sent.
    let started = Instant::now();
    let mut s = TcpStream::connect(&server.http_addr).await.unwrap();
    s.write_all(
        b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 5000000\r\n\r\n",
    )
    .await
    .unwrap();
    let (reply, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert_eq!(status_of(&reply), 413, "{}", String::from_utf8_lossy(&reply));
    assert!(String::from_utf8_lossy(&reply).contains("REQUEST_TOO_LARGE"));
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());

    // A chunked body that never ends: 413 as soon as it passes the limit, not when it ends.
    let started = Instant::now();
    let s = TcpStream::connect(&server.http_addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(b"POST /score HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n").await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = [b'['; 65536];
        let mut sent = 0usize;
        // Up to 4 MB, then it would stall forever.
        while sent < 4 << 20 {
            let head = format!("{:x}\r\n", chunk.len());
            let ok = wr.write_all(head.as_bytes()).await.is_ok()
                && wr.write_all(&chunk).await.is_ok()
                && wr.write_all(b"\r\n").await.is_ok();
            if !ok {
                break;
            }
            sent += chunk.len();
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        sent
    });
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut reply)).await.expect("no answer").unwrap();
    assert_eq!(status_of(&reply[..n]), 413, "{}", String::from_utf8_lossy(&reply[..n]));
    let chunked = started.elapsed();
    assert!(chunked < Duration::from_secs(2), "took {chunked:?}");
    writer.abort();
    eprintln!("chunked body past the limit: 413 after {chunked:?}");
    assert_eq!(normal_call(&server).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_wait_for_the_memory_budget_then_get_429() {
    let server = TestServer::start(
        &model_dir("tiny"),
        &["--memory-budget-bytes", "4194304", "--http-budget-wait", "300ms", "--max-request-bytes", "8000000"],
    )
    .await;
    // A body of 3 MB that stalls holds 3 of the 4 MiB.
    let mut holder = TcpStream::connect(&server.http_addr).await.unwrap();
    holder.write_all(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-length: 3000000\r\n\r\n[").await.unwrap();
    for _ in 0..100 {
        if server.metric("clipserve_memory_budget_held_bytes").await >= 3e6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.metric("clipserve_memory_budget_held_bytes").await >= 3e6);
    // A second one waits for room, then is refused.
    let started = Instant::now();
    let mut waiting = TcpStream::connect(&server.http_addr).await.unwrap();
    waiting.write_all(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-length: 2000000\r\n\r\n[").await.unwrap();
    let (reply, _) = read_until_closed(&mut waiting, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert_eq!(status_of(&reply), 429, "{}", String::from_utf8_lossy(&reply));
    assert!(String::from_utf8_lossy(&reply).contains("MEMORY_BUDGET_EXHAUSTED"));
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "waited {waited:?}");
    // Small calls still fit.
    let (status, latency) = normal_call(&server).await;
    assert_eq!(status, 200);
    // The held bytes are given back when the stalled client goes away.
    drop(holder);
    for _ in 0..100 {
        if server.metric("clipserve_memory_budget_held_bytes").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.metric("clipserve_memory_budget_held_bytes").await, 0.0);
    eprintln!("budget: second body refused after {waited:?}; a normal call meanwhile took {latency:?}");
}

/// Reads until the peer closes (or resets) the connection, or `limit` passes; what was read, and when it closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut buf)).await {
            Err(_) => return (out, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Some(started.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(reply: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(reply);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"))
}
