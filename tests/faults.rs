//! Failures of the real model and of handlers, injected with the hidden test-only `--inject-faults` flag and
//! observed over the wire: a failing forward pass fails its own call only; a panicking one also takes its worker
//! out of service (readiness and gRPC health say so) until the worker has reloaded its model (here after one
//! failed reload attempt), after which calls succeed again; a panicking handler fails its own call only.

mod common;

use std::time::Duration;

use clipserve::error::status_reason;
use clipserve::pb::{EmbedRequest, Item};
use common::*;
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

fn text_request(t: &str) -> EmbedRequest {
    EmbedRequest { items: vec![Item { id: t.into(), image: None, text: Some(t.into()) }], normalize: false }
}

async fn health(server: &TestServer) -> ServingStatus {
    let mut h = HealthClient::new(server.channel().await);
    let request = HealthCheckRequest { service: "clipserve.v1.Embedder".into() };
    let status = h.check(request).await.unwrap().into_inner().status;
    ServingStatus::try_from(status).unwrap()
}

async fn ready(server: &TestServer) -> u16 {
    reqwest::get(format!("{}/ready", server.http_url())).await.unwrap().status().as_u16()
}

/// Polls `probe` every 20 ms for up to `timeout` until it gives `want`; true if it did.
async fn becomes<T: PartialEq, F: std::future::Future<Output = T>>(
    timeout: Duration,
    want: T,
    mut probe: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if probe().await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn model_failures_and_panics_fail_their_own_calls_and_the_worker_recovers() {
    // Forward passes (counted from readiness): the 2nd fails, the 4th panics; the first reload attempt after it
    // fails; the 7th Embed call's handler panics.
    let spec = "model-error:after=1; model-panic:after=3; model-reload-fail; grpc-panic:after=6";
    let server = TestServer::start(&model_dir("tiny"), &["--inject-faults", spec]).await;
    assert!(server.early_log.iter().any(|l| l.contains("FAULT INJECTION IS ON")), "no warning: {:?}", server.early_log);
    let mut client = server.client().await;
    let embed_ok = |r: Result<tonic::Response<clipserve::pb::EmbedResponse>, tonic::Status>| {
        assert_eq!(r.unwrap().into_inner().embeddings[0].text_features.len(), 512);
    };

    // Call 1 (pass 1) works; call 2 (pass 2) fails alone.
    embed_ok(client.embed(text_request("one")).await);
    let status = client.embed(text_request("two")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(status_reason(&status).as_deref(), Some("MODEL_FAILURE"));
    assert_eq!(ready(&server).await, 200, "a failed forward pass does not take the worker out of service");
    embed_ok(client.embed(text_request("three")).await);

    // Call 4 (pass 4) panics: its caller gets INTERNAL, and the worker is out of service from that moment.
    let status = client.embed(text_request("four")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(status_reason(&status).as_deref(), Some("MODEL_FAILURE"));
    assert_eq!(ready(&server).await, 503, "not ready while the only worker reloads its model");
    let status = client.embed(text_request("five")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status_reason(&status).as_deref(), Some("NO_MODEL_WORKER"));
    assert!(
        becomes(Duration::from_secs(5), ServingStatus::NotServing, || health(&server)).await,
        "gRPC health never said NOT_SERVING"
    );

    // The first reload attempt fails; the second (after half a second) succeeds.
    assert!(becomes(Duration::from_secs(60), 200, || ready(&server)).await, "the worker never came back");
    assert!(becomes(Duration::from_secs(5), ServingStatus::Serving, || health(&server)).await);
    embed_ok(client.embed(text_request("six")).await);

    // Call 7: the handler panics; the same connection serves the next call.
    let status = client.embed(text_request("seven")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(status_reason(&status).as_deref(), Some("INTERNAL_PANIC"));
    embed_ok(client.embed(text_request("eight")).await);

    let m = server.metrics().await;
    let expect = [
        (r#"clipserve_model_failures_total{modality="text"}"#, 2.0),
        (r#"clipserve_panics_total{stage="model"}"#, 1.0),
        (r#"clipserve_panics_total{stage="grpc"}"#, 1.0),
        (r#"clipserve_model_items_total{modality="text"}"#, 4.0),
        (r#"clipserve_requests_total{transport="grpc",rpc="Embed",outcome="ok"}"#, 4.0),
        (r#"clipserve_requests_total{transport="grpc",rpc="Embed",outcome="internal"}"#, 3.0),
        (r#"clipserve_requests_total{transport="grpc",rpc="Embed",outcome="unavailable"}"#, 1.0),
        ("clipserve_ready", 1.0),
    ];
    for (sample, want) in expect {
        assert_eq!(metric_value(&m, sample), want, "{sample}");
    }
    let log: Vec<String> = server.log.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("injected fault: reload attempt 1 fails")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("model worker replaced its model instance")), "{log:?}");
}

#[test]
fn the_fault_switch_is_hidden_and_checked() {
    let bin = env!("CARGO_BIN_EXE_clipserve");
    let help = std::process::Command::new(bin).args(["serve", "--help"]).output().unwrap();
    assert!(help.status.success());
    assert!(!String::from_utf8_lossy(&help.stdout).contains("inject"), "the test-only flag shows in --help");
    let bad = std::process::Command::new(bin)
        .args(["serve", "--model", "/nonexistent", "--inject-faults", "model-melt"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown fault"), "{}", String::from_utf8_lossy(&bad.stderr));
}
