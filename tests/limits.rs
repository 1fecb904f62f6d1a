//! The HTTP gateway under hostile clients, over loopback: bodies over the item, text and byte limits are refused
//! while they are read and parsed, with bounded time and memory; bodies wait for the memory budget; slow, silent
//! and idle connections are closed after their timeouts; each listener's connection cap holds, and running out of
//! file descriptors on one listener leaves the other serving. Every wait is bounded, and normal calls made during
//! the attacks are timed.

mod common;

use std::time::{Duration, Instant};

use clipserve::pb::{EmbedRequest, Item};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    // Twice sixteen bodies of 12 MB at once without a declared length: their buffers grow as they arrive, in
    // pieces that the allocator must give back too.
    let small = tiny_rows(12 << 20);
    for _ in 0..2 {
        let statuses = futures::future::join_all((0..16).map(|_| post_chunked(&server.http_addr, &small))).await;
        assert!(statuses.iter().all(|s| *s == 413), "{statuses:?}");
    }
    let peak = peak.peak_mib();
    let after = settle_rss(pid, baseline + 64.0, Duration::from_secs(5)).await;
    eprintln!(
        "60 MB of tiny rows: 413 in {elapsed:?} (4 at once: {four:?}; then 2 x 16 x 12 MB chunked); RSS baseline \
         {baseline:.0} MiB, peak {peak:.0} MiB, after {after:.0} MiB; a normal call during it took {normal_latency:?}"
    );
    // Up to four bodies of 60 MB at once: their bytes, not millions of parsed values.
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

/// Sends `body` to /score in chunks of 64 KiB, without a declared length; the status of the answer. The sending
/// side stays open until the answer is read (hyper drops a request whose client half-closes).
async fn post_chunked(addr: &str, body: &[u8]) -> u16 {
    let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        let _ = send_chunked(&mut wr, &body).await;
        wr
    });
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut reply)).await;
    writer.abort();
    status_of(&reply)
}

async fn send_chunked(wr: &mut tokio::net::tcp::OwnedWriteHalf, body: &[u8]) -> std::io::Result<()> {
    wr.write_all(b"POST /score HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n").await?;
    for chunk in body.chunks(65536) {
        wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
        wr.write_all(chunk).await?;
        wr.write_all(b"\r\n").await?;
    }
    wr.write_all(b"0\r\n\r\n").await
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

#[tokio::test(flavor = "multi_thread")]
async fn silent_slow_and_idle_connections_are_closed_after_their_timeouts() {
    let server = TestServer::start(
        &model_dir("tiny"),
        &["--http-header-timeout", "500ms", "--http-idle-timeout", "1200ms", "--http-body-timeout", "800ms"],
    )
    .await;
    let addr = server.http_addr.clone();
    let limit = Duration::from_secs(5);
    // Ten connections of each kind at once.
    let silent = (0..10).map(|_| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            read_until_closed(&mut s, limit).await.1
        })
    });
    let partial_headers = (0..10).map(|_| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(b"POST /score HTTP/1.1\r\nhost: x\r\n").await.unwrap();
            // One more byte every 100 ms does not keep it open.
            while started.elapsed() < limit {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
                let (_, closed) = read_until_closed(&mut s, Duration::from_millis(100)).await;
                if closed.is_some() {
                    break;
                }
            }
            (started.elapsed() < limit).then(|| started.elapsed())
        })
    });
    let stalled_body = (0..10).map(|_| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"input_data\"")
                .await
                .unwrap();
            let (reply, closed) = read_until_closed(&mut s, limit).await;
            (status_of(&reply), closed)
        })
    });
    let idle = (0..10).map(|_| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(status_of(&buf[..n]), 200);
            read_until_closed(&mut s, limit).await.1
        })
    });
    let (silent, partial_headers, stalled_body, idle) = tokio::join!(
        futures::future::join_all(silent),
        futures::future::join_all(partial_headers),
        futures::future::join_all(stalled_body),
        futures::future::join_all(idle),
    );
    // Meanwhile (the attackers are closed by now; a normal call is also made under attack below).
    let within = |t: Option<Duration>, lo: u64, hi: u64| {
        t.is_some_and(|t| t >= Duration::from_millis(lo) && t < Duration::from_millis(hi))
    };
    let silent: Vec<_> = silent.into_iter().map(Result::unwrap).collect();
    assert!(silent.iter().all(|t| within(*t, 400, 2000)), "silent: {silent:?}");
    let partial_headers: Vec<_> = partial_headers.into_iter().map(Result::unwrap).collect();
    assert!(partial_headers.iter().all(|t| within(*t, 400, 2000)), "partial headers: {partial_headers:?}");
    let stalled_body: Vec<_> = stalled_body.into_iter().map(Result::unwrap).collect();
    assert!(stalled_body.iter().all(|(s, t)| *s == 408 && within(*t, 700, 2500)), "stalled body: {stalled_body:?}");
    let idle: Vec<_> = idle.into_iter().map(Result::unwrap).collect();
    assert!(idle.iter().all(|t| within(*t, 1000, 3000)), "idle keep-alive: {idle:?}");
    eprintln!(
        "closed after: silent {:?}, partial headers {:?}, stalled body {:?}, idle keep-alive {:?}",
        silent[0], partial_headers[0], stalled_body[0].1, idle[0]
    );

    // A normal call while 40 slow connections are open (and, for comparison, one without them).
    let (_, quiet) = normal_call(&server).await;
    let held: Vec<TcpStream> = futures::future::join_all((0..40).map(|i| {
        let addr = addr.clone();
        async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let start: &[u8] = if i % 2 == 0 {
                b"POST /score HTTP/1.1\r\nhost: x\r\n"
            } else {
                b"POST /score HTTP/1.1\r\ncontent-length: 99\r\n\r\n"
            };
            s.write_all(start).await.unwrap();
            s
        }
    }))
    .await;
    let open = server.metric(r#"clipserve_open_connections{listener="http"}"#).await;
    let (status, latency) = normal_call(&server).await;
    assert_eq!(status, 200);
    assert!(open >= 40.0, "{open} connections open");
    assert!(latency < Duration::from_secs(2), "a normal call took {latency:?}");
    eprintln!("a normal call with 40 slow connections open took {latency:?} ({quiet:?} without them)");
    wait_until("the timeouts close the slow connections", Duration::from_secs(10), || async {
        server.metric(r#"clipserve_open_connections{listener="http"}"#).await <= 2.0
    })
    .await;
    drop(held);
}

/// Opens connections to `addr` until one is closed at once (or `max` are open): the ones kept open.
async fn fill(addr: &str, max: usize) -> (Vec<TcpStream>, Option<Vec<u8>>) {
    let mut held = Vec::new();
    for _ in 0..max {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (reply, closed) = read_until_closed(&mut s, Duration::from_millis(300)).await;
        if closed.is_some() {
            return (held, Some(reply));
        }
        held.push(s);
    }
    (held, None)
}

async fn grpc_embed(server: &TestServer) -> Result<usize, String> {
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = clipserve::pb::embedder_client::EmbedderClient::new(channel);
    let items = vec![Item { id: "t".into(), image: None, text: Some("a photo of a cat".into()) }];
    let r = client.embed(EmbedRequest { items, normalize: false }).await.map_err(|s| s.to_string())?;
    Ok(r.into_inner().embeddings[0].text_features.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_listener_holds_its_cap_and_the_other_keeps_serving() {
    let server = TestServer::start(
        &model_dir("tiny"),
        &[
            "--max-http-connections",
            "8",
            "--max-grpc-connections",
            "4",
            "--http-header-timeout",
            "20s",
            "--http-idle-timeout",
            "20s",
        ],
    )
    .await;
    // HTTP full: the next connection reads 429 and is closed; gRPC still answers.
    let (held, refused) = fill(&server.http_addr, 20).await;
    let refused = refused.expect("the HTTP cap did not hold");
    assert!(held.len() <= 8, "{} HTTP connections open", held.len());
    assert_eq!(status_of(&refused), 429, "{}", String::from_utf8_lossy(&refused));
    let started = Instant::now();
    assert_eq!(grpc_embed(&server).await, Ok(512));
    let grpc_latency = started.elapsed();
    drop(held);

    // gRPC full: the next connection is closed at once and calls fail; HTTP still answers.
    let (held, refused) = fill(&server.grpc_addr, 20).await;
    assert!(refused.is_some(), "the gRPC cap did not hold");
    assert!(held.len() <= 4, "{} gRPC connections open", held.len());
    assert!(grpc_embed(&server).await.is_err());
    let (status, http_latency) = normal_call(&server).await;
    assert_eq!(status, 200);
    drop(held);
    // Room again once they are gone.
    let mut again = Err(String::new());
    for _ in 0..50 {
        again = grpc_embed(&server).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again, Ok(512));
    eprintln!("caps: gRPC call with HTTP full took {grpc_latency:?}; HTTP call with gRPC full took {http_latency:?}");
    assert!(grpc_latency < Duration::from_secs(2) && http_latency < Duration::from_secs(2));
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_on_one_listener_leaves_the_other_serving() {
    let server = TestServer::start(&model_dir("tiny"), &["--http-header-timeout", "20s"]).await;
    let pid = server.pid();
    // A gRPC connection made before the descriptors run out.
    let channel = server.channel().await;
    let mut client = clipserve::pb::embedder_client::EmbedderClient::new(channel);
    let call = || EmbedRequest {
        items: vec![Item { id: "t".into(), image: None, text: Some("a photo of a cat".into()) }],
        normalize: false,
    };
    assert!(client.embed(call()).await.is_ok());
    // Leave the server 20 descriptors to spare (connection caps are far above that).
    let limit = open_fds(pid) + 20;
    let lowered = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: prlimit(2) on our own child, with valid pointers.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &lowered, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    let mut flood = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = TcpStream::connect(&server.http_addr).await {
            flood.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The server is out of descriptors: it still runs, and the existing gRPC connection still answers.
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let started = Instant::now();
    let r = client.embed(call()).await.expect("gRPC call on an open connection");
    assert_eq!(r.into_inner().embeddings[0].text_features.len(), 512);
    let during = started.elapsed();
    drop(flood);
    // Descriptors come back: both listeners accept again.
    let mut ok = false;
    for _ in 0..50 {
        if reqwest::get(format!("{}/health", server.http_url())).await.is_ok_and(|r| r.status() == 200) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the HTTP listener did not recover");
    assert_eq!(grpc_embed(&server).await, Ok(512));
    let errors = server.metric(r#"clipserve_accept_errors_total{listener="http"}"#).await;
    assert!(errors > 0.0, "no accept error was seen: the test did not run out of descriptors");
    eprintln!("out of descriptors: {errors} failed accepts; a gRPC call meanwhile took {during:?}");
}
