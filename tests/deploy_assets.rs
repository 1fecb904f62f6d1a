//! The deployment assets: the Kubernetes manifests pass the offline schema validator (and the validator does
//! fail on a broken manifest, and on a bulk-embedding Job that would not split its input or would be taken for a
//! server), and the Python client example embeds a folder and texts exactly as the server does.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clipserve::pb::{item::Image, EmbedRequest, Item};
use common::*;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The project virtualenv's interpreter (made by deploy/setup.sh).
fn python() -> PathBuf {
    let python = root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run dev/test.sh (it sets up the virtualenv)", python.display());
    python
}

/// Runs the virtualenv's python on `args` from the repository root, off the async runtime.
async fn run_python(args: Vec<String>) -> Output {
    let python = python();
    tokio::task::spawn_blocking(move || Command::new(python).args(args).current_dir(root()).output())
        .await
        .unwrap()
        .expect("running python")
}

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("clipserve-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn validator() -> String {
    root().join("deploy/kubernetes/validate.py").display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kubernetes_manifests_pass_the_offline_schema_validation() {
    let out = run_python(vec![validator()]).await;
    assert!(out.status.success(), "deploy/kubernetes/validate.py failed:\n{}", report(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for file in [
        "deployment.yaml",
        "service-grpc-headless.yaml",
        "service-http.yaml",
        "hpa.yaml",
        "pdb.yaml",
        "bulk/embed-job.yaml",
        "tls/certificates.yaml",
        "tls/kustomization.yaml: 10 objects built",
    ] {
        assert!(stdout.lines().any(|l| l.starts_with("ok") && l.contains(file)), "{file} was not validated:\n{stdout}");
    }
    assert!(stdout.contains("valid for Kubernetes 1.30"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_validator_fails_on_a_broken_manifest() {
    let original = std::fs::read_to_string(root().join("deploy/kubernetes/deployment.yaml")).unwrap();
    assert_eq!(original.matches("\nspec:\n").count(), 1, "deployment.yaml has one top-level spec");
    assert!(original.contains("readinessProbe:"));
    let dir = TempDir::new("broken-manifests");

    // A replica count that is not a number.
    let replicas = original.replace("\nspec:\n", "\nspec:\n  replicas: \"two\"\n");
    let replicas_file = dir.path().join("deployment.yaml");
    std::fs::write(&replicas_file, replicas).unwrap();
    let out = run_python(vec![validator(), replicas_file.display().to_string()]).await;
    assert!(!out.status.success(), "a Deployment with replicas: \"two\" passed:\n{}", report(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.replicas") && stderr.contains("'two'"), "{}", report(&out));

    // A misspelt field: only a strict (no unknown fields) schema check sees it.
    let typo = original.replace("readinessProbe:", "readinesProbe:");
    let typo_file = dir.path().join("typo.yaml");
    std::fs::write(&typo_file, typo).unwrap();
    let out = run_python(vec![validator(), typo_file.display().to_string()]).await;
    assert!(!out.status.success(), "a misspelt readinessProbe passed:\n{}", report(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("readinesProbe"), "{}", report(&out));

    // The intact manifest from the same folder passes: the failures above are the edits.
    let intact_file = dir.path().join("intact.yaml");
    std::fs::write(&intact_file, &original).unwrap();
    let out = run_python(vec![validator(), intact_file.display().to_string()]).await;
    assert!(out.status.success(), "{}", report(&out));
}

/// Copies deploy/kubernetes (with its subfolders) under `dir`.
fn copy_manifests(dir: &Path) -> PathBuf {
    let to = dir.join("kubernetes");
    for entry in walkdir::WalkDir::new(root().join("deploy/kubernetes")) {
        let entry = entry.unwrap();
        let relative = entry.path().strip_prefix(root().join("deploy/kubernetes")).unwrap();
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(to.join(relative)).unwrap();
        } else {
            std::fs::copy(entry.path(), to.join(relative)).unwrap();
        }
    }
    to
}

#[tokio::test(flavor = "multi_thread")]
async fn the_validator_checks_the_tls_overlay_as_built() {
    let dir = TempDir::new("tls-overlay");
    let edit = |file: &str, from: &str, to: &str| {
        let k = copy_manifests(dir.path());
        let path = k.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has {from}");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        k
    };
    let cases = [
        // Probes on the HTTP port: with mutual TLS the kubelet, which has no client certificate, is refused.
        ("deployment.yaml", "port: health", "port: http", "not the plaintext health port"),
        // gRPC probes speak no TLS.
        (
            "deployment.yaml",
            "httpGet:\n              path: /ready\n              port: health",
            "grpc:\n              port: 50051",
            "speaks no TLS",
        ),
        // The server reads a Secret that no Certificate writes.
        (
            "tls/deployment-tls.json",
            r#""secretName": "clipserve-tls""#,
            r#""secretName": "clipserve-certs""#,
            "written by no Certificate",
        ),
        // A Certificate without the Secret it writes; one whose issuer is not defined.
        ("tls/certificates.yaml", "  secretName: clipserve-tls\n", "", "spec.secretName"),
        (
            "tls/certificates.yaml",
            "name: clipserve-selfsigned\n    kind: Issuer",
            "name: nobody\n    kind: Issuer",
            "is not defined here",
        ),
        // A patch that no longer fits the Deployment.
        ("tls/deployment-tls.json", "/volumeMounts/-", "/mounts/-", "does not apply"),
    ];
    for (file, from, to, why) in cases {
        let k = edit(file, from, to);
        let out = run_python(vec![validator(), k.display().to_string(), k.join("tls").display().to_string()]).await;
        assert!(!out.status.success(), "{file}: {to:?} passed:\n{}", report(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{file}: {}", report(&out));
    }
    let k = copy_manifests(dir.path());
    let out = run_python(vec![validator(), k.display().to_string(), k.join("tls").display().to_string()]).await;
    assert!(out.status.success(), "{}", report(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_validator_fails_on_a_bulk_job_that_would_not_split_its_input_or_would_be_taken_for_a_server() {
    let original = std::fs::read_to_string(root().join("deploy/kubernetes/bulk/embed-job.yaml")).unwrap();
    for needle in [
        "completionMode: Indexed",
        "completions: 8",
        "--shard=$(JOB_COMPLETION_INDEX)/8",
        "--server=http://clipserve-grpc:50051",
        "app.kubernetes.io/name: clipserve-embed",
    ] {
        assert!(original.contains(needle), "embed-job.yaml has {needle}");
    }
    let dir = TempDir::new("broken-job");
    // The Job is checked against the serving manifests it sends to.
    let serving: Vec<String> = ["deployment.yaml", "service-grpc-headless.yaml", "service-http.yaml", "pdb.yaml"]
        .iter()
        .map(|f| root().join("deploy/kubernetes").join(f).display().to_string())
        .collect();
    let validate = |name: &str, text: String| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let mut args = vec![validator()];
        args.extend(serving.iter().cloned());
        args.push(file.display().to_string());
        run_python(args)
    };
    let cases = [
        // Four parts for eight pods: pods 4 to 7 get no part (--shard 4/4 is refused); with /16, half the input none.
        (
            "shards.yaml",
            original.replace("JOB_COMPLETION_INDEX)/8", "JOB_COMPLETION_INDEX)/4"),
            "splits the input in 4 parts",
        ),
        // Client pods labelled like server pods would become endpoints of the gRPC Service.
        ("labels.yaml", original.replace("name: clipserve-embed", "name: clipserve"), "selected by"),
        // A ClusterIP Service pins a connection, and every stream on it, to one pod.
        ("server.yaml", original.replace("clipserve-grpc:50051", "clipserve-http:8080"), "not headless"),
    ];
    for (name, text, why) in cases {
        let out = validate(name, text).await;
        assert!(!out.status.success(), "{name} passed:\n{}", report(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{name}: {}", report(&out));
    }
    let out = validate("intact.yaml", original).await;
    assert!(out.status.success(), "{}", report(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_client_embeds_a_folder_and_texts_as_the_server_does() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let work = TempDir::new("python-client");
    let images_dir = work.path().join("images");
    std::fs::create_dir_all(&images_dir).unwrap();
    // 20 images: more than one 16-image stream message, of several formats.
    let fixtures =
        ["landscape_640x480.jpg", "portrait_480x640.png", "webp_320x240.webp", "gif_200x120.gif", "rgba_257x199.png"];
    let mut images: HashMap<String, Vec<u8>> = HashMap::new();
    for copy in 0..4 {
        for name in fixtures {
            let id = format!("{copy}_{name}");
            std::fs::copy(fixtures_dir().join("images").join(name), images_dir.join(&id)).expect("fixture image");
            images.insert(id.clone(), std::fs::read(images_dir.join(&id)).unwrap());
        }
    }
    let texts = ["a photo of a cat", "a diagram of a ship's engine room"];
    let out_file = work.path().join("embeddings.jsonl");

    let mut args = vec![
        root().join("examples/python_client/embed_folder.py").display().to_string(),
        "--server".into(),
        server.grpc_addr.clone(),
        "--images".into(),
        images_dir.display().to_string(),
        "--out".into(),
        out_file.display().to_string(),
        "--normalize".into(),
    ];
    for t in texts {
        args.extend(["--text".to_string(), t.to_string()]);
    }
    let out = run_python(args).await;
    assert!(out.status.success(), "embed_folder.py failed:\n{}", report(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("embedded 20 images and 2 texts (0 failed)"), "summary line: {stdout}");

    // One line per image and per text, 512 numbers each.
    let lines: Vec<Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), images.len() + texts.len(), "output lines");
    let mut items = Vec::new();
    let mut got: HashMap<String, Vec<f32>> = HashMap::new();
    for line in &lines {
        let id = line["id"].as_str().expect("id").to_string();
        let embedding: Vec<f32> =
            line["embedding"].as_array().expect("embedding").iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(embedding.len(), 512, "{id}");
        match line["kind"].as_str().expect("kind") {
            "image" => {
                let bytes = images.get(&id).unwrap_or_else(|| panic!("unexpected image id {id}")).clone();
                items.push(Item { id: id.clone(), image: Some(Image::ImageBytes(bytes)), text: None });
            }
            "text" => {
                let text = line["text"].as_str().expect("text").to_string();
                assert!(texts.contains(&text.as_str()), "{text}");
                items.push(Item { id: id.clone(), image: None, text: Some(text) });
            }
            other => panic!("unexpected kind {other}"),
        }
        assert!(got.insert(id.clone(), embedding).is_none(), "{id} written twice");
    }
    assert_eq!(items.iter().filter(|i| i.image.is_some()).count(), images.len(), "every image once");

    // The same inputs straight over gRPC.
    let mut client = server.client().await;
    let want = client.embed(EmbedRequest { items, normalize: true }).await.unwrap().into_inner().embeddings;
    assert_eq!(want.len(), lines.len());
    for w in &want {
        let expected = if w.image_features.is_empty() { &w.text_features } else { &w.image_features };
        let actual = &got[&w.id];
        let norm = actual.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{}: --normalize gave norm {norm}", w.id);
        let diff = actual.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(cosine(actual, expected) > 0.99999 && diff < 1e-4, "{}: max abs difference {diff}", w.id);
    }
}
