//! dev/gpu_benchmark.py, the benchmark meant for a machine with CUDA, runs here on the CPU with tiny counts
//! (`--quick --device cpu`, the tiny model): every stage runs, the one table it prints has every row with sane
//! numbers and no failed call, its logs are kept, and its servers are gone when it ends. Asked for CUDA where
//! there is none, it says so and stops.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{model_dir, report};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the benchmark script with the virtualenv's python, on the binary under test.
fn run_benchmark(args: &[&str]) -> Output {
    let python = root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run dev/test.sh (it sets up the virtualenv)", python.display());
    Command::new(python)
        .arg(root().join("dev/gpu_benchmark.py"))
        .args(["--binary", env!("CARGO_BIN_EXE_clipserve")])
        .args(args)
        .current_dir(root())
        .output()
        .expect("running dev/gpu_benchmark.py")
}

fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let dir = std::env::temp_dir().join(format!("clipserve-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A number of the table ("1,234.5"); None for "-".
fn number(cell: &str) -> Option<f64> {
    (cell != "-").then(|| cell.replace(',', "").parse().unwrap_or_else(|_| panic!("not a number: {cell:?}")))
}

#[test]
fn the_gpu_benchmark_runs_on_the_cpu_and_prints_one_table_of_sane_numbers() {
    let out_dir = temp_dir("gpu-benchmark");
    let model = model_dir("tiny");
    let started = std::time::Instant::now();
    let out = run_benchmark(&[
        "--quick",
        "--device",
        "cpu",
        "--modes",
        "exact,fast",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    eprintln!("dev/gpu_benchmark.py --quick --device cpu took {:?}", started.elapsed());
    assert!(out.status.success(), "the benchmark failed:\n{}", report(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);

    // One table: a header row, a separator, then the rows; nothing else in the output looks like a table.
    let table: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(stdout.lines().filter(|l| l.starts_with("| stage |")).count(), 1, "exactly one table header:\n{stdout}");
    assert!(table[0].starts_with("| stage | input |") && table[1].starts_with("| --- |"), "{stdout}");
    let header: Vec<&str> = table[0].trim_matches('|').split('|').map(str::trim).collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name}"));
    let mut seen = BTreeSet::new();
    for line in &table[2..] {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), header.len(), "{line}");
        let (stage, input, shape) = (cells[0], cells[1], cells[2]);
        let items_per_s = number(cells[col("items/s")]).expect("items/s");
        let p50 = number(cells[col("p50 ms")]).expect("p50");
        let p90 = number(cells[col("p90 ms")]).expect("p90");
        let p99 = number(cells[col("p99 ms")]).expect("p99");
        assert!(items_per_s > 0.0 && items_per_s.is_finite(), "{line}");
        assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99 && p99 < 120_000.0, "latencies out of order: {line}");
        assert_eq!(number(cells[col("failed calls")]), Some(0.0), "{line}");
        let mean_batch = number(cells[col("mean batch")]).expect("mean batch");
        assert!(mean_batch >= 1.0, "{line}");
        if stage != "raw forward" {
            let cores = number(cells[col("server cores busy")]).expect("server cores busy");
            assert!(cores > 0.0, "the server did work: {line}");
        }
        // Rows name what they measured; keep the kind of input and the batch or call shape.
        let kind = if input.starts_with("image") || input.contains("JPEG") { "image" } else { "text" };
        let mode = ["exact", "fast"].into_iter().find(|m| input.ends_with(m)).unwrap_or("");
        assert!(seen.insert((stage.to_string(), kind, mode, shape.to_string())), "a row twice: {line}");
    }
    let rows: BTreeSet<(&str, &str, &str, &str)> =
        seen.iter().map(|(s, k, m, sh)| (s.as_str(), *k, *m, sh.as_str())).collect();
    let mut expected = BTreeSet::new();
    for kind in ["image", "text"] {
        for batch in ["batch 1", "batch 64", "batch 256"] {
            expected.insert(("raw forward", kind, "", batch));
        }
    }
    for mode in ["exact", "fast"] {
        expected.insert(("gRPC Embed", "image", mode, "8 x 2"));
        expected.insert(("single request", "image", mode, "1 x 1"));
    }
    expected.insert(("gRPC Embed", "text", "", "16 x 2"));
    expected.insert(("single request", "text", "", "1 x 1"));
    assert_eq!(rows, expected, "the table's rows:\n{stdout}");

    // The logs and the raw results are kept.
    let table_md = std::fs::read_to_string(out_dir.join("table.md")).expect("table.md");
    assert!(stdout.contains(table_md.trim()), "table.md is the printed table");
    let results: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["rows"].as_array().unwrap().len(), expected.len());
    assert!(results.get("failure").is_none(), "{}", results["failure"]);
    let run_log = std::fs::read_to_string(out_dir.join("run.log")).unwrap();
    assert!(run_log.contains("bench --raw-model"), "the raw forward runs are logged");
    for mode in ["exact", "fast"] {
        let log = std::fs::read_to_string(out_dir.join(format!("server-{mode}.log"))).unwrap();
        let grpc = log
            .lines()
            .find_map(|l| l.strip_prefix("listening grpc="))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("server-{mode}.log has no listening line:\n{log}"));
        // The server was stopped: nothing listens there any more.
        assert!(std::net::TcpStream::connect(grpc).is_err(), "the {mode} server on {grpc} is still running");
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn asked_for_cuda_without_a_gpu_it_says_so_and_stops() {
    if Path::new("/dev/nvidia0").exists() {
        eprintln!("this machine has a GPU: nothing to check");
        return;
    }
    let out_dir = temp_dir("gpu-benchmark-nocuda");
    let out = run_benchmark(&["--quick", "--device", "cuda", "--out", out_dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", report(&out));
    assert!(stderr.contains("CUDA is not available") && stderr.contains("--device cpu"), "{}", report(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("| stage |"), "no table without a run");
    let _ = std::fs::remove_dir_all(&out_dir);
}
