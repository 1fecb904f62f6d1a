#!/usr/bin/env python3
"""Side-by-side benchmark on one machine, full-size ViT-B/32 (random weights are fine for speed):

  (a) the raw TorchScript forward in a loop (`clipserve bench --raw-model`), at the batch size the server reached;
  (b) clipserve end to end over gRPC (`clipserve bench`), concurrency 1, 8 and 64, one item per call:
      a 640x480 JPEG per image call, a short caption per text call;
  (c) the Python reference pipeline (what the Azure endpoint computes): PIL decode + transformers
      CLIPProcessor + CLIPModel.get_image_features / get_text_features, on the same inputs, at batch sizes
      1, 8 and 64.

Writes a markdown table (throughput, latency percentiles, ratios) to --out and prints it.
Run it with the project's virtualenv: .venv/bin/python dev/benchmark.py

Then the image pipeline per core (--preprocess-only runs just this part), on three photo-like JPEGs (quality 88:
640x480, 1280x960, 3000x2000, made by dev/make_test_photos.py), side by side in one run, in interleaved
rounds (median of --rounds), every process pinned to one core and its rate counted per second of the CPU time
it used (so other load on the machine matters less):

  - Pillow + transformers' CLIPImageProcessor, Pillow path (`CLIPImageProcessorPil`, what the exact mode
    reproduces), from encoded bytes to the pixel tensor;
  - the same with torchvision importable, which makes CLIPImageProcessor resize with torchvision (torchvision
    0.26.0 is installed with --no-deps into target/bench-torchvision for this, never into the virtualenv);
  - `clipserve bench --preprocess` (exact and fast): the pipeline alone, one thread, with the time per stage;
  - clipserve serve --preprocess exact|fast, --cpu-threads 1, the tiny test model on CPU, loaded over gRPC by
    `clipserve bench` on another core: images answered per CPU second of the server process (all its threads).

and the projection to a 16-core host against the H100's model stage (about 27k img/s at batch 256).
"""

import argparse
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "clipserve"
CONCURRENCY = [1, 8, 64]


sys.path.insert(0, str(Path(__file__).resolve().parent))

TORCHVISION_DIR = ROOT / "target" / "bench-torchvision"
# The H100 figure the projection compares with (ViT-B/32 image tower, fp16, batch 256; shared/ENVIRONMENT.md).
H100_IMAGES_PER_SECOND = 27_000
PIPELINE_SIZES = [(640, 480), (1280, 960), (3000, 2000)]


def log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def make_jpeg(path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / 40) * np.cos(y / 30), 255 * y / 480, 255 * x / 640], axis=-1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, "JPEG", quality=90)


def run_json(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    subprocess.run([str(BIN), "bench", *args, "--json", out], check=True, stdout=subprocess.DEVNULL)
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


class Server:
    def __init__(self, model: Path, device: str, extra: list[str], cpu: int | None = None):
        self.proc = subprocess.Popen(
            # The load repeats its inputs: without the content cache, every item costs its preprocessing and forward.
            [str(BIN), "serve", "--model", str(model), "--device", device, "--grpc-addr", "127.0.0.1:0",
             "--http-addr", "127.0.0.1:0", "--cache-mb", "0", *extra],
            stderr=subprocess.PIPE, text=True, preexec_fn=None if cpu is None else pin(cpu),
        )
        for line in self.proc.stderr:
            if line.startswith("listening "):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                self.grpc, self.http = fields["grpc"], fields["http"]
                break
        else:
            raise SystemExit("server exited before listening")
        import threading
        import urllib.request

        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://{self.http}/ready").status == 200:
                    return
            except Exception:
                time.sleep(0.1)
        raise SystemExit("server never became ready")

    def metrics(self) -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://{self.http}/metrics").read().decode()

    def metric(self, sample: str) -> float:
        m = re.search(r"^" + re.escape(sample) + r" (\S+)$", self.metrics(), re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def python_reference(model_dir: Path, jpeg: bytes, texts: list[str], batch: int, kind: str, seconds: float) -> dict:
    """transformers + PIL, batch at a time, as a Python serving stack would run it."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    global _REF
    if "_REF" not in globals() or _REF[0] != model_dir:
        hf = model_dir / "hf"
        _REF = (model_dir, CLIPModel.from_pretrained(str(hf)).eval(), CLIPImageProcessorPil(),
                CLIPTokenizer.from_pretrained(str(hf)))
    _, model, processor, tokenizer = _REF
    torch.set_grad_enabled(False)

    def step(i: int):
        if kind == "image":
            images = [Image.open(io.BytesIO(jpeg)) for _ in range(batch)]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            model.get_image_features(pixel_values=pixels)
        else:
            enc = tokenizer([f"{texts[0]} {(i * batch + j) % 1000}" for j in range(batch)], padding=True,
                            truncation=True, max_length=77, return_tensors="pt")
            model.get_text_features(**enc)

    step(0)
    latencies = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds or i < 3:
        t0 = time.perf_counter()
        step(i)
        latencies.append((time.perf_counter() - t0) * 1e3)
        i += 1
    elapsed = time.perf_counter() - start
    lat = np.array(latencies)
    return {"items_per_second": i * batch / elapsed,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                           "p99": float(np.percentile(lat, 99))}}


def pin(cpu: int):
    """A preexec_fn pinning a child process to one CPU."""
    return lambda: os.sched_setaffinity(0, {cpu})


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_preprocess(paths: list[str], seconds: float) -> list[dict]:
    """In a child process: transformers' CLIPImageProcessor from encoded bytes to the pixel tensor, per image,
    counted per CPU second of this process. The backend is the one transformers picks (see the callers)."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor

    torch.set_num_threads(1)
    processor = CLIPImageProcessor()
    out = []
    for path in paths:
        data = Path(path).read_bytes()

        def step():
            return processor(images=[Image.open(io.BytesIO(data))], return_tensors="pt")["pixel_values"]

        step()
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds or n < 3:
            step()
            n += 1
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        out.append({"image": path, "per_core": n / cpu, "wall": n / wall, "backend": type(processor).__name__})
    return out


def ensure_torchvision() -> bool:
    """torchvision 0.26.0 (the one torch 2.11.0 goes with) in target/bench-torchvision, installed without its
    dependencies so that torch stays as it is; False when it cannot be installed."""
    if (TORCHVISION_DIR / "torchvision").is_dir():
        return True
    log(f"installing torchvision==0.26.0 --no-deps into {TORCHVISION_DIR} (for the torchvision-backend row)")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                        str(TORCHVISION_DIR), "torchvision==0.26.0"])
    return r.returncode == 0


def python_reference_rates(paths: list[str], torchvision: bool, seconds: float, cpu: int) -> list[dict]:
    env = dict(os.environ)
    if torchvision:
        env["PYTHONPATH"] = str(TORCHVISION_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    else:
        env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, __file__, "--python-preprocess", json.dumps([paths, seconds])], env=env,
                         check=True, capture_output=True, text=True, preexec_fn=pin(cpu))
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    want = "CLIPImageProcessor" if torchvision else "CLIPImageProcessorPil"
    if rows[0]["backend"] != want:
        raise SystemExit(f"expected transformers to pick {want}, got {rows[0]['backend']}")
    return rows


def fidelity_section() -> str:
    """The fast path's distance from the exact one, as tests/fidelity.rs last measured it."""
    path = ROOT / "target" / "test-photos" / "fidelity.json"
    lines = ["## Fidelity of `--preprocess fast`", ""]
    if not path.exists():
        return "\n".join(lines + ["Not measured yet: run `cargo test --release --test fidelity` (or dev/test.sh), "
                                   "then this script again.", ""])
    f = json.loads(path.read_text())
    lines += [
        f"From `tests/fidelity.rs` (`cargo test --release --test fidelity -- --nocapture` prints every image): "
        f"{f['images']} images from `dev/make_test_photos.py` (JPEGs of 200x150 to 3000x2000, panoramas and "
        "tall strips, gray, 4:2:0 / 4:2:2 / 4:4:4, progressive, qualities 60 to 98, CMYK; PNG and WebP). The "
        f"fast path decodes {f['jpegs_scaled']} of them scaled; the others (other formats, CMYK, JPEGs whose short "
        "side is under 447 pixels) come out identical to the exact path.",
        "",
        "| over the scaled JPEGs | fast vs exact |",
        "| --- | ---: |",
        f"| worst max difference of a normalised pixel | {f['worst_max_pixel_difference']:.4f} "
        f"({f['worst_max_pixel_difference_image']}) |",
        f"| mean absolute difference of a normalised pixel | {f['mean_absolute_difference']:.5f} |",
        f"| worst cosine of the embeddings (ViT-B/32, {f['weights']}) | {f['worst_cosine']:.6f} "
        f"({f['worst_cosine_image']}) |",
        "",
        "Normalised pixels span about 4 units (one 8-bit level is about 0.015). The full-size model has seeded random "
        "weights here (no hub access): its embeddings have no meaning, and trained weights may be more or less "
        "sensitive to these differences.",
        "",
    ]
    return "\n".join(lines)


def pipeline_benchmark(args) -> str:
    """The per-core image pipeline table (see the module docstring)."""
    from make_test_photos import photo_like

    ncpu = len(os.sched_getaffinity(0))
    server_cpu, client_cpu = sorted(os.sched_getaffinity(0))[0], sorted(os.sched_getaffinity(0))[-1]
    work = Path(tempfile.mkdtemp(prefix="clipserve-pipeline-"))
    paths = []
    for w, h in PIPELINE_SIZES:
        path = work / f"{w}x{h}.jpg"
        photo_like(w, h, seed=0).save(path, "JPEG", quality=88)
        paths.append(str(path))
    sizes = {p: Path(p).stat().st_size for p in paths}
    torchvision = ensure_torchvision()
    tiny = ROOT / "target" / "test-models" / "tiny"
    servers = {mode: Server(tiny, "cpu", ["--preprocess", mode, "--cpu-threads", "1", "--torch-threads", "1"],
                            cpu=server_cpu) for mode in ["exact", "fast"]}
    samples: dict = {}

    def add(name, path, value):
        samples.setdefault((name, path), []).append(value)

    try:
        for rnd in range(args.rounds):
            log(f"pipeline round {rnd + 1}/{args.rounds}")
            for r in python_reference_rates(paths, False, args.pipeline_seconds, server_cpu):
                add("pil", r["image"], r["per_core"])
            if torchvision:
                for r in python_reference_rates(paths, True, args.pipeline_seconds, server_cpu):
                    add("torchvision", r["image"], r["per_core"])
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([str(BIN), "bench", "--preprocess", *paths, "--duration", f"{args.pipeline_seconds}s",
                                "--json", f.name], check=True, stdout=subprocess.DEVNULL, preexec_fn=pin(server_cpu))
                report = json.loads(Path(f.name).read_text())
            for r in report["results"]:
                add(f"bench-{r['mode']}", r["image"], r["images_per_second"])
                add(f"stages-{r['mode']}", r["image"], r["stages_ms"])
            for mode, server in servers.items():
                for path in paths:
                    c0 = cpu_seconds(server.proc.pid)
                    with tempfile.NamedTemporaryFile(suffix=".json") as f:
                        subprocess.run([str(BIN), "bench", "--server", f"http://{server.grpc}", "--kind", "image",
                                        "--image", path, "--concurrency", "4", "--items", "8", "--duration",
                                        f"{args.pipeline_seconds}s", "--warmup", "0s", "--json", f.name],
                                       check=True, stdout=subprocess.DEVNULL, preexec_fn=pin(client_cpu))
                        r = json.loads(Path(f.name).read_text())
                    used = cpu_seconds(server.proc.pid) - c0
                    if r["requests_failed"]:
                        raise SystemExit(f"server {mode}: {r['errors'][:3]}")
                    add(f"server-{mode}", path, r["requests_ok"] * r["items_per_request"] / max(used, 1e-9))
    finally:
        for server in servers.values():
            server.stop()

    def med(name, path):
        values = samples.get((name, path))
        return float(np.median(values)) if values else float("nan")

    def gmean(name):
        return float(np.exp(np.mean([np.log(med(name, p)) for p in paths])))

    def stages(mode, path):
        s = samples[(f"stages-{mode}", path)]
        return {k: float(np.median([x[k] for x in s])) for k in ["decode", "resize", "normalize"]}

    ref_names = ["pil"] + (["torchvision"] if torchvision else [])
    best_ref = {p: max(med(n, p) for n in ref_names) for p in paths}
    best_ref_g = float(np.exp(np.mean([np.log(best_ref[p]) for p in paths])))
    label = {"pil": "Pillow + CLIPImageProcessor (Pillow path)",
             "torchvision": "Pillow + CLIPImageProcessor (torchvision backend)",
             "bench-exact": "clipserve exact (`bench --preprocess`)", "bench-fast": "clipserve fast (`bench --preprocess`)",
             "server-exact": "clipserve exact, server (1 preprocessing thread, tiny model)",
             "server-fast": "clipserve fast, server (1 preprocessing thread, tiny model)"}
    names = ref_names + ["bench-exact", "bench-fast", "server-exact", "server-fast"]
    head = [f"{w}x{h} ({sizes[p] // 1000} KB)" for (w, h), p in zip(PIPELINE_SIZES, paths)]
    lines = [
        "## Image pipeline per core",
        "",
        f"Written by `dev/benchmark.py --preprocess-only` on {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} CPU core(s). Photo-like JPEGs (quality 88, 4:2:0) from `dev/make_test_photos.py`, "
        "encoded bytes to the model's input tensor. Images per second per core: every process pinned to one core "
        f"(the server on CPU {server_cpu}, its load generator on CPU {client_cpu}), its images divided by the CPU "
        f"time it used; median of {args.rounds} interleaved rounds of {args.pipeline_seconds:.0f} s per row and "
        "image. Server rows: `clipserve serve --preprocess MODE --cpu-threads 1 --torch-threads 1` on the tiny test "
        "model, loaded over gRPC (4 calls of 8 images in flight), counted per CPU second of the whole server "
        "(gRPC, batching and the model included).",
        "",
        "| path | " + " | ".join(head) + " | geometric mean |",
        "| --- | " + " | ".join("---:" for _ in head) + " | ---: |",
    ]
    for n in names:
        lines.append(f"| {label[n]} | " + " | ".join(f"{med(n, p):.1f}" for p in paths) + f" | {gmean(n):.1f} |")
    lines += ["", "Ratios to the faster Python reference for each image "
              f"({', '.join(label[n].split('(')[1].rstrip(')') for n in ref_names)}; geometric mean "
              f"{best_ref_g:.1f} img/s):", "",
              "| clipserve | " + " | ".join(head) + " | geometric mean |",
              "| --- | " + " | ".join("---:" for _ in head) + " | ---: |"]
    for n in ["bench-exact", "bench-fast", "server-exact", "server-fast"]:
        lines.append(f"| {label[n]} | " + " | ".join(f"{med(n, p) / best_ref[p]:.2f}x" for p in paths)
                     + f" | {gmean(n) / best_ref_g:.2f}x |")
    lines += ["", "Time per image and stage (`clipserve bench --preprocess`, CPU ms; normalisation is fused into the "
              "last resize pass and timed apart):", "",
              "| mode | " + " | ".join(head) + " |", "| --- | " + " | ".join("---" for _ in head) + " |"]
    for mode in ["exact", "fast"]:
        cells = []
        for p in paths:
            st = stages(mode, p)
            cells.append(f"decode {st['decode']:.2f}, resize {st['resize']:.2f}, normalise {st['normalize']:.3f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", f"Projection to a 16-core host (16 x the per-core rate of the server rows; the H100's model stage "
              f"takes about {H100_IMAGES_PER_SECOND // 1000}k img/s):", "",
              "| path | " + " | ".join(head) + " | cores to feed the H100 (geometric mean) |",
              "| --- | " + " | ".join("---:" for _ in head) + " | ---: |"]
    for n in ref_names + ["server-exact", "server-fast"]:
        lines.append(f"| {label[n]} | " + " | ".join(f"{16 * med(n, p):,.0f} img/s" for p in paths)
                     + f" | {H100_IMAGES_PER_SECOND / gmean(n):.0f} |")
    lines += ["", "Command: `.venv/bin/python dev/benchmark.py --preprocess-only` (after `dev/test.sh`, which "
              "exports the tiny model); `clipserve bench --preprocess IMAGE...` prints the same per-core rates and "
              "stages for any image.", ""]
    return "\n".join(lines) + "\n" + fidelity_section()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "target" / "test-models" / "vit-b32",
                    help="model directory exported with --save-hf (default: the tests' full-size model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per row")
    ap.add_argument("--out", type=Path, default=ROOT / "dev" / "BENCHMARKS.md")
    ap.add_argument("--preprocess-only", action="store_true",
                    help="measure only the image pipeline table, and replace that section of --out")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the image pipeline table")
    ap.add_argument("--pipeline-seconds", type=float, default=3.0, help="seconds per row, image and round")
    ap.add_argument("--python-preprocess", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.python_preprocess:
        paths, seconds = json.loads(args.python_preprocess)
        print(json.dumps(python_preprocess(paths, seconds)))
        return
    if args.preprocess_only:
        table = pipeline_benchmark(args)
        old = args.out.read_text() if args.out.exists() else "# clipserve benchmark\n"
        marker = "## Image pipeline per core"
        text = (old.split(marker)[0].rstrip() + "\n\n" if marker in old else old.rstrip() + "\n\n") + table
        args.out.write_text(text)
        print(table)
        return
    if not (args.model / "hf").is_dir():
        raise SystemExit(f"{args.model}/hf missing: export with deploy/export_model.py --save-hf (dev/test.sh does)")

    work = Path(tempfile.mkdtemp(prefix="clipserve-bench-"))
    jpeg_path = work / "640x480.jpg"
    make_jpeg(jpeg_path)
    jpeg = jpeg_path.read_bytes()
    texts = ["a photo of a cat"]  # each call appends a number below 1000, as `clipserve bench` does
    secs = f"{args.seconds}s"
    rows = []

    server = Server(args.model, args.device, [])
    try:
        for kind in ["image", "text"]:
            batches_before = server.metric(f'clipserve_batch_size_count{{modality="{kind}"}}')
            items_before = server.metric(f'clipserve_batch_size_sum{{modality="{kind}"}}')
            for c in CONCURRENCY:
                log(f"clipserve {kind} concurrency {c}")
                b0 = server.metric(f'clipserve_batch_size_count{{modality="{kind}"}}')
                i0 = server.metric(f'clipserve_batch_size_sum{{modality="{kind}"}}')
                extra = ["--image", str(jpeg_path)] if kind == "image" else ["--text", texts[0]]
                r = run_json(["--server", f"http://{server.grpc}", "--kind", kind, "--concurrency", str(c),
                              "--items", "1", "--duration", secs, "--warmup", "2s", *extra])
                b1 = server.metric(f'clipserve_batch_size_count{{modality="{kind}"}}')
                i1 = server.metric(f'clipserve_batch_size_sum{{modality="{kind}"}}')
                r["mean_batch"] = (i1 - i0) / max(b1 - b0, 1)
                rows.append(("clipserve gRPC", kind, c, r))
            del batches_before, items_before
    finally:
        server.stop()

    from transformers import CLIPTokenizer

    tokens = len(CLIPTokenizer.from_pretrained(str(args.model / "hf"))(f"{texts[0]} 500")["input_ids"])
    for kind in ["image", "text"]:
        reached = next(r for (name, k, c, r) in rows if k == kind and c == max(CONCURRENCY))["mean_batch"]
        batch = max(1, int(round(reached)))
        log(f"raw forward {kind} batch {batch}")
        r = run_json(["--raw-model", str(args.model), "--device", args.device, "--kind", kind, "--batch", str(batch),
                      "--duration", secs, "--warmup", "2s", "--text-tokens", str(tokens)])
        r["mean_batch"] = batch
        rows.append(("raw TorchScript forward", kind, batch, r))

    for kind in ["image", "text"]:
        for batch in CONCURRENCY:
            log(f"python reference {kind} batch {batch}")
            r = python_reference(args.model, jpeg, texts, batch, kind, args.seconds)
            r["mean_batch"] = batch
            rows.append(("Python transformers+PIL", kind, batch, r))

    def find(name, kind, c):
        return next(r for (n, k, cc, r) in rows if n == name and k == kind and cc == c)

    lines = [
        "# clipserve benchmark",
        "",
        f"Written by `dev/benchmark.py` on {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU "
        f"core(s), device `{args.device}`, model `{args.model.name}` (full-size ViT-B/32 architecture; "
        f"{json.loads((args.model / 'manifest.json').read_text())['weights']}). {args.seconds:.0f} s per row.",
        "",
        "clipserve rows: one item per gRPC `Embed` call at the given concurrency (a 640x480 JPEG, or a short",
        "caption); `batch` is the mean forward-pass size the server formed. Raw rows: `clipserve bench --raw-model`,",
        "the TorchScript forward alone at the batch size the server reached at concurrency 64. Python rows:",
        "PIL decode + `CLIPImageProcessor` / `CLIPTokenizer` + `CLIPModel.get_*_features`, one batch at a time.",
        "",
        "| path | input | concurrency / batch | mean batch | items/s | p50 ms | p90 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, kind, c, r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {name} | {kind} | {c} | {r['mean_batch']:.1f} | {r['items_per_second']:.1f} | "
                     f"{lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} |")
    top = max(CONCURRENCY)
    lines += ["", "Ratios:", ""]
    for kind in ["image", "text"]:
        e2e = find("clipserve gRPC", kind, top)["items_per_second"]
        raw = next(r for (n, k, c, r) in rows if n == "raw TorchScript forward" and k == kind)["items_per_second"]
        py_one = find("Python transformers+PIL", kind, 1)["items_per_second"]
        py_best = max(find("Python transformers+PIL", kind, b)["items_per_second"] for b in CONCURRENCY)
        lines.append(f"- {kind}: clipserve at concurrency {top} = {e2e / raw:.2f}x the raw forward at the same batch "
                     f"size; {e2e / py_one:.2f}x the Python pipeline run request by request (batch 1, as the Azure "
                     f"endpoint serves one-item calls); {e2e / py_best:.2f}x the best Python batch row "
                     f"({py_best:.1f} items/s).")
    text = "\n".join(lines) + "\n"
    text += "\n" + pipeline_benchmark(args)
    # The file's GPU section is dev/gpu_benchmark.py's documentation: kept as it is.
    old = args.out.read_text() if args.out.exists() else ""
    gpu = old.find("\n## GPU benchmark")
    args.out.write_text(text + (old[gpu:] if gpu >= 0 else ""))
    print(text)


if __name__ == "__main__":
    main()
