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
    def __init__(self, model: Path, device: str, extra: list[str]):
        self.proc = subprocess.Popen(
            # The load repeats its inputs: without the content cache, every item costs its preprocessing and forward.
            [str(BIN), "serve", "--model", str(model), "--device", device, "--grpc-addr", "127.0.0.1:0",
             "--http-addr", "127.0.0.1:0", "--cache-mb", "0", *extra],
            stderr=subprocess.PIPE, text=True,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "target" / "test-models" / "vit-b32",
                    help="model directory exported with --save-hf (default: the tests' full-size model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per row")
    ap.add_argument("--out", type=Path, default=ROOT / "dev" / "BENCHMARKS.md")
    args = ap.parse_args()
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
    # The file's GPU section is dev/gpu_benchmark.py's documentation: kept as it is.
    old = args.out.read_text() if args.out.exists() else ""
    gpu = old.find("\n## GPU benchmark")
    args.out.write_text(text + (old[gpu:] if gpu >= 0 else ""))
    print(text)


if __name__ == "__main__":
    main()
