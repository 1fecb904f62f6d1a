#!/usr/bin/env python3
"""clipserve on a GPU, in one table.

On a machine with CUDA and the release binary (target/release/clipserve), this script

  1. exports the model there (deploy/export_model.py --random-init: the full-size ViT-B/32 architecture with
     seeded random weights, as fast as the real ones), unless --model names an exported model directory;
  2. times the raw model stage with `clipserve bench --raw-model`: the server's own code for a batch (host
     staging, copy to the device, forward pass, results back), images and texts at batch 1, 64 and 256;
  3. serves the model (`clipserve serve --device cuda --preprocess MODE`, once per --modes entry) and loads it
     over gRPC `Embed`: 640x480 photo-like JPEGs (Pillow, quality 88) many calls at once, short texts many calls at
     once, then one request at a time (single-request latency);

then prints one markdown table and exits non-zero if any call failed. Everything stays in --out: the table
(table.md), every number measured (results.json), this script's log (run.log), the export's log and each
server's stdout and stderr (server-MODE.log).

    python3 dev/gpu_benchmark.py                                  # on the GPU machine
    .venv/bin/python dev/gpu_benchmark.py --quick --device cpu    # a smoke run anywhere (the tests do this)

Every image item carries its own bytes (a JPEG comment with a counter) and every text its own number, so an
answer can never be served from a cache of earlier inputs. Latencies are per gRPC call, client-side.

Needs Python with torch (whose libtorch the binary is given), numpy, Pillow, grpcio and tokenizers; exporting also
needs transformers and CLIP's BPE vocabulary (open_clip_torch, installed with --no-deps), or pass --model. The
messages are encoded here from the proto's field numbers, so no generated stubs (and no protobuf version) are
needed.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.util
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BIN = ROOT / "target" / "release" / "clipserve"
RAW_BATCHES = [1, 64, 256]
MAX_MESSAGE_BYTES = 64 << 20
EMBED = "/clipserve.v1.Embedder/Embed"
INFO = "/clipserve.v1.Embedder/Info"

LOG_FILE = None


def log(msg: str) -> None:
    line = f"[gpu-benchmark {time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    if LOG_FILE is not None:
        LOG_FILE.write(line + "\n")
        LOG_FILE.flush()


class BenchmarkError(Exception):
    """A failure that ends the run with a clear message (the server is stopped first)."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def photo_like_jpegs(count: int, width: int = 640, height: int = 480, quality: int = 88) -> list[bytes]:
    """Distinct JPEGs with what makes photos cost what they cost to decode: smooth light and colour, objects with
    hard and soft edges, fine texture and sensor-like grain (a flat or synthetic-looking image compresses too
    well, and decodes too fast)."""
    import numpy as np
    from PIL import Image, ImageFilter

    out = []
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for seed in range(count):
        rng = np.random.default_rng(1000 + seed)
        img = np.empty((height, width, 3), np.float32)
        for c in range(3):  # low-frequency light and colour
            fx, fy = rng.uniform(0.5, 3.0, 2) * 2 * math.pi / np.array([width, height])
            img[..., c] = rng.uniform(80, 170) + rng.uniform(30, 70) * np.sin(fx * x + fy * y + rng.uniform(0, 6.3))
        for _ in range(14):  # objects: ellipses, edges from soft to sharp, shaded
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            rx, ry = rng.uniform(15, 150, 2)
            x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, width))
            y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, height))
            if x0 >= x1 or y0 >= y1:
                continue
            xs, ys = x[y0:y1, x0:x1], y[y0:y1, x0:x1]
            inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2
            alpha = np.clip((1 - inside) * rng.uniform(2, 40), 0, 1)[..., None]
            shade = (1 - 0.35 * (ys - cy) / ry)[..., None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + alpha * shade * rng.uniform(0, 255, 3)
        texture = np.kron(rng.normal(0, 1, (height // 3 + 1, width // 3 + 1)), np.ones((3, 3)))[:height, :width]
        img += 8 * texture[..., None] + rng.normal(0, 4, img.shape)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


NOUNS = ["cat", "dog", "bicycle", "mountain lake", "city street", "bowl of fruit", "red car", "old lighthouse"]
PLACES = ["at sunset", "in the rain", "on a sunny day", "at night", "in winter", "from above"]


def short_text(i: int) -> str:
    return f"a photo of a {NOUNS[i % len(NOUNS)]} {PLACES[(i // len(NOUNS)) % len(PLACES)]}, number {i}"


def text_tokens(model_dir: Path, samples: int = 2000) -> int:
    """Token count (start and end tokens included) of the longest of the first `samples` benchmark texts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return max(len(e.ids) for e in tok.encode_batch([short_text(i) for i in range(samples)]))


# ---------------------------------------------------------------------------------------------------------------
# Protocol buffers, by field number (proto/clipserve/v1/clipserve.proto): Item{id=1, image_bytes=2, text=5},
# EmbedRequest{items=1}, EmbedResponse{embeddings=1}, Embedding{id=1, image_features=2, text_features=3,
# error=4}, ItemError{code=1, message=2, reason=3}, InfoResponse{model_id=1, weights=2, embedding_dim=3,
# device=4, dtype=5}.
# ---------------------------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(number: int, payload_len: int) -> bytes:
    """The key and length of a length-delimited field (its payload follows)."""
    return varint(number << 3 | 2) + varint(payload_len)


def read_varint(buf, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(buf, start: int = 0, end: int | None = None):
    """Yields (field number, wire type, value): an int for varints, (start, end) for length-delimited fields, the
    raw bytes for fixed-width ones."""
    i, end = start, len(buf) if end is None else end
    while i < end:
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            value, i = (i, i + n), i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > end:
            raise ValueError("field runs past the end of the message")
        yield number, wire, value


def item_bytes(item_id: str, image: list[bytes] | None = None, text: str | None = None) -> list[bytes]:
    """One `Item` as a field of `EmbedRequest`, as parts to join (an image's bytes are not copied here)."""
    body = [length_delimited(1, len(item_id.encode())), item_id.encode()]
    if image is not None:
        size = sum(len(p) for p in image)
        body += [length_delimited(2, size), *image]
    if text is not None:
        encoded = text.encode()
        body += [length_delimited(5, len(encoded)), encoded]
    return [length_delimited(1, sum(len(p) for p in body)), *body]


def unique_jpeg(jpeg: bytes, n: int) -> list[bytes]:
    """The JPEG with a comment segment holding `n` right after its start marker: other bytes, same pixels."""
    comment = f"clipserve-benchmark {n}".encode()
    return [b"\xff\xd8\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment, jpeg[2:]]


def check_embed_response(buf: bytes, expected: int, modality: int, dim: int) -> None:
    """Raises unless `buf` holds `expected` embeddings of `dim` floats of the modality (field 2 images, 3 texts)
    and no item error. The first embedding's values must be finite."""
    import numpy as np

    count = 0
    for number, wire, value in fields(buf):
        if number != 1 or wire != 2:
            continue
        floats, first = 0, None
        for n, w, v in fields(buf, *value):
            if n == 4 and w == 2:
                error = {k: bytes(buf[x[0] : x[1]]).decode(errors="replace") for k, kw, x in fields(buf, *v) if kw == 2}
                raise ValueError(f"item error {error.get(3, '')}: {error.get(2, '')}")
            if n == modality:
                if w == 2:
                    floats += (v[1] - v[0]) // 4
                    first = first or v
                elif w == 5:
                    floats += 1
        if floats != dim:
            raise ValueError(f"embedding {count} has {floats} values, expected {dim}")
        if count == 0 and first is not None and not np.isfinite(np.frombuffer(buf[first[0] : first[1]], "<f4")).all():
            raise ValueError("non-finite values in an embedding")
        count += 1
    if count != expected:
        raise ValueError(f"{count} embeddings for {expected} items")


def parse_info(buf: bytes) -> dict:
    names = {1: "model_id", 2: "weights", 4: "device", 5: "dtype"}
    info = {}
    for number, wire, value in fields(buf):
        if number in names and wire == 2:
            info[names[number]] = bytes(buf[value[0] : value[1]]).decode()
        elif number == 3 and wire == 0:
            info["embedding_dim"] = value
    return info


# ---------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------


def child_env(torch_lib: Path) -> dict:
    """The binary gets this Python's libtorch first on its library path (on a machine other than the one it was
    built on, its rpath points nowhere)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(torch_lib), env.get("LD_LIBRARY_PATH", "")] if p)
    env.setdefault("RUST_LOG", "info")
    return env


def die_with_parent() -> None:
    """In the child, before exec: killed when this script dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    rest = stat[stat.rfind(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A `clipserve serve` process on free local ports, its output in `log_path`."""

    def __init__(self, binary: Path, model: Path, device: str, mode: str | None, extra: list[str], log_path: Path,
                 env: dict, ready_timeout: float):
        self.log_path = log_path
        cmd = [str(binary), "serve", "--model", str(model), "--device", device, "--grpc-addr", "127.0.0.1:0",
               "--http-addr", "127.0.0.1:0", *(["--preprocess", mode] if mode else []), *extra]
        log(f"starting: {shlex.join(cmd)}")
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=die_with_parent)
        self.grpc = self.http = None
        try:
            self._wait_ready(ready_timeout)
        except BaseException:  # a failed start, a timeout, Ctrl-C or SIGTERM: the process goes too
            self.stop()
            raise

    def _wait_ready(self, ready_timeout: float) -> None:
        log_path = self.log_path
        deadline = time.monotonic() + ready_timeout
        while self.grpc is None:
            self._check_alive("before listening")
            m = re.search(r"^listening grpc=(\S+) http=(\S+)", log_path.read_text(errors="replace"), re.M)
            if m:
                self.grpc, self.http = m.group(1), m.group(2)
            elif time.monotonic() > deadline:
                raise BenchmarkError(f"the server did not listen within {ready_timeout:.0f}s; see {log_path}")
            else:
                time.sleep(0.05)
        while not self._ready():
            self._check_alive("while loading the model")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the server was not ready within {ready_timeout:.0f}s; see {log_path}")
            time.sleep(0.1)
        log(f"server ready: grpc {self.grpc}, http {self.http}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://{self.http}/ready", timeout=2).status == 200
        except Exception:
            return False

    def _check_alive(self, when: str) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
            raise BenchmarkError(f"the server exited ({self.proc.returncode}) {when}; {self.log_path} ends:\n{tail}")

    def metric(self, sample: str) -> float:
        try:
            text = urllib.request.urlopen(f"http://{self.http}/metrics", timeout=10).read().decode()
        except OSError as e:
            self._check_alive("during the run")
            raise BenchmarkError(f"reading the server's metrics failed: {e}")
        m = re.search(r"^" + re.escape(sample) + r" (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("the server did not stop within 30s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


# ---------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Load:
    name: str
    kind: str  # image | text
    items: int  # per call
    concurrency: int  # calls in flight
    seconds: float | None  # measured time; None: `calls` calls
    calls: int
    warmup: float
    mode: str | None = None


def percentile(sorted_values: list, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values), max(1, math.ceil(len(sorted_values) * q))) - 1]


async def drive(target: str, load: Load, jpegs: list[bytes], dim: int, call_timeout: float, counter: list,
                alive) -> dict:
    """Keeps `load.concurrency` calls in flight. Timed loads: after the warm-up, the calls that end within the
    measured window count (throughput: their items over the window); the window lasts `load.seconds`, longer if
    fewer than two calls per slot ended in it (calls slower than the window). Counted loads: every call counts."""
    import grpc

    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        embed = channel.unary_unary(EMBED)  # bytes in, bytes out
        done: list[tuple[float, float]] = []  # (end, seconds) of each successful call
        failures: list[tuple[float, str]] = []  # (end, error)
        state = {"stop": False, "issued": 0}

        def request() -> bytes:
            parts = []
            for _ in range(load.items):
                n = counter[0]
                counter[0] += 1
                if load.kind == "image":
                    parts += item_bytes(f"i{n}", image=unique_jpeg(jpegs[n % len(jpegs)], n))
                else:
                    parts += item_bytes(f"t{n}", text=short_text(n))
            return b"".join(parts)

        async def worker():
            while not state["stop"]:
                if load.seconds is None:
                    if state["issued"] >= load.calls:
                        return
                    state["issued"] += 1
                body = request()
                t0 = time.perf_counter()
                try:
                    answer = await embed(body, timeout=call_timeout)
                    check_embed_response(answer, load.items, 2 if load.kind == "image" else 3, dim)
                    t1 = time.perf_counter()
                    done.append((t1, t1 - t0))
                except Exception as e:  # grpc.aio.AioRpcError, or an answer that is not what was asked for
                    code = e.code().name if hasattr(e, "code") else type(e).__name__
                    text = e.details() if hasattr(e, "details") else str(e)
                    failures.append((time.perf_counter(), f"{code}: {(text or '')[:200]}"))
                    if not alive():  # no point in calling a dead server until the time is up
                        state["stop"] = True

        tasks = [asyncio.ensure_future(worker()) for _ in range(load.concurrency)]
        try:
            if load.seconds is not None:
                await asyncio.sleep(load.warmup)
                start = time.perf_counter()
                cpu0 = time.process_time()
                await asyncio.sleep(load.seconds)
                give_up = start + max(10 * load.seconds, call_timeout)
                while (sum(1 for t1, _ in done if t1 >= start) < 2 * load.concurrency and not state["stop"]
                       and time.perf_counter() < give_up):
                    await asyncio.sleep(0.05)
                end = time.perf_counter()
                cpu = time.process_time() - cpu0
                state["stop"] = True
                await asyncio.gather(*tasks)  # the calls in flight finish, uncounted
            else:
                start = time.perf_counter()
                cpu0 = time.process_time()
                await asyncio.gather(*tasks)
                end = time.perf_counter()
                cpu = time.process_time() - cpu0
        finally:
            state["stop"] = True
            for t in tasks:
                t.cancel()
        counted = [took for t1, took in done if start <= t1 <= end]
        errors: dict[str, int] = {}
        for _, error in failures:  # all of them, warm-up included: a failure is never noise
            errors[error] = errors.get(error, 0) + 1
        lat = sorted(x * 1e3 for x in counted)
        elapsed = end - start
        return {
            "seconds": elapsed,
            "calls_ok": len(counted),
            "calls_failed": len(failures),
            "errors": errors,
            "items": len(counted) * load.items,
            "items_per_second": len(counted) * load.items / elapsed if elapsed > 0 else 0.0,
            "latency_ms": {"p50": percentile(lat, 0.5), "p90": percentile(lat, 0.9), "p99": percentile(lat, 0.99),
                           "mean": sum(lat) / len(lat) if lat else float("nan"), "max": lat[-1] if lat else float("nan")},
            "client_cpu_fraction": cpu / elapsed if elapsed > 0 else 0.0,
        }


def run_load(server: Server, load: Load, jpegs: list[bytes], dim: int, call_timeout: float, counter: list) -> dict:
    log(f"{load.name}: {load.items} item(s) per call, {load.concurrency} call(s) in flight, "
        + (f"{load.warmup:g}s warm-up + {load.seconds:g}s" if load.seconds is not None else f"{load.calls} calls"))
    batches = f'clipserve_batch_size_count{{modality="{load.kind}"}}'
    batched = f'clipserve_batch_size_sum{{modality="{load.kind}"}}'
    before = {"batches": server.metric(batches), "items": server.metric(batched)}
    wall0, cpu0 = time.perf_counter(), server.cpu_seconds()
    result = asyncio.run(drive(server.grpc, load, jpegs, dim, call_timeout, counter, server.alive))
    wall, cpu = time.perf_counter() - wall0, server.cpu_seconds() - cpu0
    batches_run = server.metric(batches) - before["batches"]
    result["mean_batch"] = (server.metric(batched) - before["items"]) / batches_run if batches_run else float("nan")
    result["server_cores_busy"] = cpu / wall if wall > 0 else float("nan")
    result.update({"name": load.name, "kind": load.kind, "mode": load.mode, "items_per_call": load.items,
                   "concurrency": load.concurrency})
    log(f"{load.name}: {result['items_per_second']:.1f} items/s, p50 {result['latency_ms']['p50']:.1f} ms, "
        f"{result['calls_failed']} failed call(s), mean batch {result['mean_batch']:.1f}, "
        f"server {result['server_cores_busy']:.1f} cores, client {100 * result['client_cpu_fraction']:.0f}% of a core")
    for error, count in result["errors"].items():
        log(f"  {count} x {error}")
    return result


def raw_forward(binary: Path, model: Path, device: str, kind: str, batch: int, tokens: int, quick: bool,
                seconds: float, env: dict, run_log) -> dict:
    """`clipserve bench --raw-model`: the worker's code for one batch, in a loop, no server."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    # --quick: one forward after the first (which is always run, unmeasured).
    timing = ["--requests", "1", "--warmup", "0s"] if quick else ["--duration", f"{seconds}s", "--warmup", "2s"]
    cmd = [str(binary), "bench", "--raw-model", str(model), "--device", device, "--kind", kind, "--batch",
           str(batch), "--text-tokens", str(tokens), *timing, "--json", str(out)]
    log(f"raw forward {kind} batch {batch}: {shlex.join(cmd)}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=die_with_parent,
                              timeout=(120 if quick else seconds + 300))
        run_log.write(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
        run_log.flush()
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise BenchmarkError(f"`clipserve bench --raw-model` failed ({proc.returncode}):\n{tail}")
        report = json.loads(out.read_text())
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"`clipserve bench --raw-model` ({kind}, batch {batch}) timed out")
    finally:
        out.unlink(missing_ok=True)
    lat = report["latency_ms"]
    log(f"raw forward {kind} batch {batch}: {report['items_per_second']:.1f} items/s, p50 {lat['p50']:.2f} ms")
    return {"name": "raw forward", "kind": kind, "batch": batch, "text_tokens": tokens if kind == "text" else None,
            "items_per_second": report["items_per_second"], "latency_ms": lat, "calls_ok": report["requests_ok"],
            "calls_failed": report["requests_failed"], "errors": {e: 1 for e in report["errors"]}, "report": report}


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------


def find_model(args, size: str, torch_env: dict, export_log: Path) -> Path:
    if args.model:
        if not (args.model / "manifest.json").is_file():
            raise BenchmarkError(f"{args.model} holds no exported model (no manifest.json)")
        return args.model
    existing = ROOT / "target" / "test-models" / size
    if (existing / "manifest.json").is_file() and (existing / "model.pt").is_file():
        log(f"using the exported {size} model in {existing}")
        return existing
    cached = args.model_cache / size
    if (cached / "manifest.json").is_file():
        log(f"using the model exported earlier in {cached}")
        return cached
    if importlib.util.find_spec("transformers") is None:
        raise BenchmarkError("exporting the model needs transformers; install it or pass --model DIR")
    if importlib.util.find_spec("open_clip") is None:
        raise BenchmarkError(
            "exporting offline needs CLIP's BPE vocabulary from open_clip_torch: `pip install --no-deps "
            "open_clip_torch==3.3.0` (on a machine without network, carry its wheel), or pass --model DIR")
    cmd = [sys.executable, str(ROOT / "deploy" / "export_model.py"), "--out", str(cached), "--force",
           "--tiny" if size == "tiny" else "--random-init"]
    log(f"exporting the {size} model to {cached}: {shlex.join(cmd)} (log: {export_log})")
    t0 = time.perf_counter()
    with open(export_log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=torch_env, timeout=1800,
                                  preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"the export took over 30 minutes; see {export_log}")
    if proc.returncode != 0:
        tail = "\n".join(export_log.read_text(errors="replace").splitlines()[-10:])
        raise BenchmarkError(f"the export failed ({proc.returncode}); {export_log} ends:\n{tail}")
    log(f"exported in {time.perf_counter() - t0:.0f}s")
    return cached


def environment(device: str, binary: Path) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
           "cpu_cores": os.cpu_count(), "binary": str(binary), "device": device}
    if device.startswith("cuda"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
        env["gpu"] = env["nvidia_smi"].split("\n")[0].split(",")[0] if env["nvidia_smi"] else "?"
    return env


def supports_preprocess(binary: Path, env: dict) -> bool:
    out = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, env=env, timeout=60)
    return "--preprocess" in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def fmt(x, digits=1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def table(rows: list[dict], header: list[str]) -> str:
    lines = header + [
        "",
        "| stage | input | items per call x calls in flight | mean batch | items/s | p50 ms | p90 ms | p99 ms | server cores busy | failed calls |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lat = r["latency_ms"]
        if r["name"] == "raw forward":
            what = "image 3x224x224" if r["kind"] == "image" else f"text, {r['text_tokens']} tokens"
            shape, batch, cores = f"batch {r['batch']}", fmt(float(r["batch"]), 0), "-"
        else:
            what = ("640x480 JPEG, " + (r["mode"] or "exact")) if r["kind"] == "image" else "short text"
            shape, batch, cores = f"{r['items_per_call']} x {r['concurrency']}", fmt(r["mean_batch"]), fmt(r["server_cores_busy"])
        lines.append(f"| {r['name']} | {what} | {shape} | {batch} | {fmt(r['items_per_second'])} | {fmt(lat['p50'], 2)} | "
                     f"{fmt(lat['p90'], 2)} | {fmt(lat['p99'], 2)} | {cores} | {r['calls_failed']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    global LOG_FILE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny counts (a few calls per row): checks that everything runs, measures nothing")
    ap.add_argument("--modes", default="exact,fast", help="preprocessing modes to serve, comma-separated (default: %(default)s)")
    ap.add_argument("--model", type=Path, help="an exported model directory to use (default: export one)")
    ap.add_argument("--model-size", choices=["tiny", "vit-b32"],
                    help="model to export when --model is not given (default: tiny for --quick --device cpu, else vit-b32)")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "target" / "gpu-benchmark" / "models",
                    help="where exported models are kept between runs (default: %(default)s)")
    ap.add_argument("--binary", type=Path, default=DEFAULT_BIN, help="the clipserve binary (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="folder for the table, results and logs (default: target/gpu-benchmark/<time>)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per gRPC load row (default: %(default)s)")
    ap.add_argument("--raw-seconds", type=float, default=3.0, help="measured seconds per raw forward row (default: %(default)s)")
    ap.add_argument("--single-seconds", type=float, default=5.0, help="measured seconds per single-request row (default: %(default)s)")
    ap.add_argument("--image-items", type=int, default=32, help="images per call under load (default: %(default)s)")
    ap.add_argument("--image-concurrency", type=int, default=16, help="image calls in flight (default: %(default)s)")
    ap.add_argument("--text-items", type=int, default=64, help="texts per call under load (default: %(default)s)")
    ap.add_argument("--text-concurrency", type=int, default=16, help="text calls in flight (default: %(default)s)")
    ap.add_argument("--call-timeout", type=float, default=120.0, help="deadline of each gRPC call, seconds (default: %(default)s)")
    ap.add_argument("--ready-timeout", type=float, default=600.0,
                    help="seconds a server may take to load and warm up (default: %(default)s)")
    ap.add_argument("--server-args", default="", help="extra flags for `clipserve serve`, one string (shell quoting)")
    args = ap.parse_args()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("exact", "fast") for m in modes):
        ap.error(f"--modes takes exact and/or fast, comma-separated; got {args.modes!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device takes cpu, cuda or cuda:N; got {args.device!r}")
    for name in ("image_items", "image_concurrency", "text_items", "text_concurrency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    out = args.out or ROOT / "target" / "gpu-benchmark" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    LOG_FILE = open(out / "run.log", "a")
    # SIGTERM (a timeout around the run), SIGINT and SIGHUP unwind the same way, so the server is stopped on the
    # way out (and should this script be killed outright, the server gets SIGKILL: `die_with_parent`).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, interrupted)

    missing = [m for m in ("torch", "numpy", "PIL", "grpc", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"missing Python packages: {', '.join(missing)} (torch, numpy, pillow, grpcio, tokenizers are needed)")
        return 2
    if not args.binary.is_file():
        log(f"{args.binary} not found: build it with `cargo build --release --locked` (or pass --binary)")
        return 2
    import torch

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            log(f"--device {args.device} asked for, but CUDA is not available to this Python's torch "
                f"({torch.__version__}, built for CUDA {torch.version.cuda}): no GPU, no driver, or "
                f"CUDA_VISIBLE_DEVICES hides it. Use --device cpu to run on the CPU.")
            return 2
        index = int(args.device.split(":")[1]) if ":" in args.device else 0
        if index >= torch.cuda.device_count():
            log(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
            return 2
    torch_lib = Path(torch.__file__).parent / "lib"
    env = child_env(torch_lib)
    quick = args.quick
    size = args.model_size or ("tiny" if quick and args.device == "cpu" else "vit-b32")
    server_extra = shlex.split(args.server_args)
    counter = [0]
    rows: list[dict] = []
    servers: list[Server] = []
    info_seen: dict = {}
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": {k: str(v) for k, v in vars(args).items()},
               "environment": environment(args.device, args.binary), "rows": rows}
    log(f"output folder: {out}")
    try:
        # Before anything long: a binary older than the --preprocess flag serves only the exact mode.
        has_flag = supports_preprocess(args.binary, env)
        if not has_flag:
            if modes != ["exact"]:
                raise BenchmarkError(f"{args.binary} has no --preprocess flag, so it cannot serve {modes}; "
                                     "rebuild it, or pass --modes exact")
            log(f"{args.binary} has no --preprocess flag: serving its only preprocessing, exact")
        model = find_model(args, size, env, out / "export.log")
        manifest = json.loads((model / "manifest.json").read_text())
        dim = int(manifest["embedding_dim"])
        results["model"] = {"dir": str(model), **{k: manifest.get(k) for k in ("model_id", "weights", "embedding_dim")}}
        tokens = text_tokens(model)
        jpegs = photo_like_jpegs(4 if quick else 16)
        results["jpeg_bytes"] = [len(j) for j in jpegs]
        log(f"{len(jpegs)} photo-like 640x480 JPEGs (quality 88), {min(map(len, jpegs)) // 1024}-"
            f"{max(map(len, jpegs)) // 1024} KiB; short texts of up to {tokens} tokens")

        with open(out / "run.log", "a") as run_log:
            for kind in ["image", "text"]:
                for batch in RAW_BATCHES:
                    rows.append(raw_forward(args.binary, model, args.device, kind, batch, tokens, quick,
                                            args.raw_seconds, env, run_log))

        def load(name, kind, items, concurrency, seconds, mode=None):
            if quick:  # a handful of calls, no warm-up
                items, concurrency = min(items, 8 if kind == "image" else 16), min(concurrency, 2)
                return Load(name, kind, items, concurrency, None, 5 if concurrency == 1 else 4, 0.0, mode)
            return Load(name, kind, items, concurrency, seconds, 0, 2.0 if concurrency > 1 else 1.0, mode)

        for i, mode in enumerate(modes):
            server = Server(args.binary, model, args.device, mode if has_flag else None, server_extra,
                            out / f"server-{mode}.log", env, args.ready_timeout)
            servers.append(server)
            try:
                info = parse_info(asyncio.run(call_info(server.grpc, args.call_timeout)))
                info_seen = info
                log(f"Info: {info}")
                if args.device.startswith("cuda") and not info.get("device", "").startswith("cuda"):
                    raise BenchmarkError(f"the server runs on {info.get('device')!r}, not {args.device}")
                loads = [load("gRPC Embed", "image", args.image_items, args.image_concurrency, args.seconds, mode)]
                if i == 0:  # texts do not depend on the image preprocessing: once
                    loads.append(load("gRPC Embed", "text", args.text_items, args.text_concurrency, args.seconds))
                loads.append(load("single request", "image", 1, 1, args.single_seconds, mode))
                if i == 0:
                    loads.append(load("single request", "text", 1, 1, args.single_seconds))
                for spec in loads:
                    rows.append(run_load(server, spec, jpegs, dim, args.call_timeout, counter))
            finally:
                server.stop()
    except BenchmarkError as e:
        log(f"FAILED: {e}")
        results["failure"] = str(e)
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        results["failure"] = "interrupted"
        return 130
    finally:
        for s in servers:
            s.stop()
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    order = {"raw forward": 0, "gRPC Embed": 1, "single request": 2}
    rows_sorted = sorted(rows, key=lambda r: (order[r["name"]], r["kind"] != "image", modes.index(r["mode"]) if r.get("mode") in modes else 0))
    env_info = results["environment"]
    where = env_info.get("gpu", platform.processor() or platform.machine())
    header = [
        f"clipserve GPU benchmark, {time.strftime('%Y-%m-%d')}: device `{info_seen.get('device', args.device)}` ({where}), "
        f"{info_seen.get('dtype', '?')}, {env_info['cpu_cores']} CPU cores, torch {env_info['torch']}; model "
        f"`{manifest['model_id']}` ({manifest['weights']}){'; --quick: counts too small to measure anything' if quick else ''}.",
        "Raw forward: `clipserve bench --raw-model` (host staging, copy to the device, forward, results back; latency "
        "per batch). gRPC rows: `Embed` calls to `clipserve serve`, every item distinct; latency per call, client-side; "
        "mean batch is what the server formed; server cores busy is its CPU time over wall time.",
    ]
    text = table(rows_sorted, header)
    busy_client = [r for r in rows if r.get("client_cpu_fraction", 0) > 0.8 and r["concurrency"] > 1]
    if busy_client:
        text += ("\nNote: the Python client used over 80% of a core during "
                 + ", ".join(f"{r['name']} {r['kind']} {r.get('mode') or ''}".strip() for r in busy_client)
                 + ": those rows may be limited by the client.\n")
    (out / "table.md").write_text(text)
    failed = sum(r["calls_failed"] for r in rows)
    print(text, flush=True)
    log(f"table, results and logs in {out}")
    if failed:
        log(f"{failed} call(s) failed: see results.json and the server logs")
        return 1
    return 0


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


async def call_info(target: str, timeout: float) -> bytes:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        return await channel.unary_unary(INFO)(b"", timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
