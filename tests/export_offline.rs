//! `deploy/export_model.py --random-init` works on a machine without network: run with every socket connection and
//! name lookup refused (and reported), it writes the full-size ViT-B/32 model without trying the network once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the export script with the network cut off inside the Python process: `connect`, `connect_ex`,
/// `getaddrinfo` and `create_connection` raise, after printing a marker the test looks for (a caller may swallow
/// the error, as the hub client does while it retries).
const OFFLINE_RUNNER: &str = r#"
import runpy, socket, sys
def refuse(*args, **kwargs):
    print("NETWORK ATTEMPT", args[:2], file=sys.stderr, flush=True)
    raise OSError("network access during an offline export")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse
sys.argv = ["deploy/export_model.py"] + sys.argv[1:]
runpy.run_path("deploy/export_model.py", run_name="__main__")
"#;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn random_init_export_never_touches_the_network() {
    let python = root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run dev/test.sh (it sets up the virtualenv)", python.display());
    let out_dir = TempDir(std::env::temp_dir().join(format!("clipserve-offline-export-{}", std::process::id())));
    let start = Instant::now();
    let out = Command::new(python)
        .args(["-c", OFFLINE_RUNNER, "--random-init", "--force", "--out"])
        .arg(&out_dir.0)
        .current_dir(root())
        // The script must not rely on the caller to say it is offline.
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .output()
        .expect("running python");
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "export failed ({}):\n{stderr}", out.status);
    assert!(!stderr.contains("NETWORK ATTEMPT"), "the export tried the network:\n{stderr}");
    // Without the network it used to sit through about 30 s of hub client retries before the export began.
    assert!(elapsed < Duration::from_secs(240), "the export took {elapsed:?}");

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.0.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["weights"], "random-init:seed=0");
    assert_eq!(manifest["model_id"], "openai/clip-vit-base-patch32");
    assert_eq!(manifest["embedding_dim"], 512);
    assert_eq!(manifest["context_length"], 77);
    assert_eq!(manifest["image_size"], 224);
    assert_eq!(manifest["tokenizer_source"], "open_clip:bpe_simple_vocab_16e6");
    // The hub config's initial logit scale (ln(1/0.07)), kept for zero-shot classification.
    let logit_scale = manifest["logit_scale"].as_f64().expect("logit_scale in the manifest");
    assert!((logit_scale - 2.6592).abs() < 1e-4, "logit_scale {logit_scale}");
    // The ViT-B/32 size: about 151 M float32 parameters.
    let size = std::fs::metadata(out_dir.0.join("model.pt")).unwrap().len();
    assert!((590_000_000..620_000_000).contains(&size), "model.pt of {size} bytes");
    eprintln!("offline ViT-B/32 export took {elapsed:?}");
}
