#!/usr/bin/env python3
"""Measures `clipserve embed` against `clipserve bench --stream` on the same local servers and the same items.

Builds (once, cached under target/bulk-bench/) a webdataset of --items samples in shards of --shard-items, every
sample the same image (and, with --text, the same caption), starts --servers local servers on --model, then, for
each of --rounds rounds:

  - `clipserve bench --stream --kind image` on every server at once, --bench-concurrency streams each, for
    --bench-seconds: the items per second the servers answer when the load generator costs nothing to read;
  - `clipserve embed --format clip-retrieval` over the dataset against all servers: items per second (items over
    the wall time of the run, start-up and the last partition included), the client's CPU seconds per item and
    the servers' over the same run (from /proc), and the client's peak resident memory (wait4's ru_maxrss).

Prints a table and the median ratio embed / bench. Run it after dev/test.sh (it uses the release binary and
the tiny test model by default):

    .venv/bin/python dev/bulk_benchmark.py                       # 20 000 items, 1 server, 3 rounds
    .venv/bin/python dev/bulk_benchmark.py --items 1000000 --rounds 1 --no-bench   # memory on 10^6 items
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/clipserve"
TICK = os.sysconf("SC_CLK_TCK")


def make_dataset(folder: Path, items: int, shard_items: int, image: bytes, text: str | None) -> str:
    """Webdataset shards of `items` samples; returns the brace pattern naming them."""
    shards = (items + shard_items - 1) // shard_items
    stamp = folder / "done.json"
    want = {"items": items, "shard_items": shard_items, "image_bytes": len(image), "text": text}
    pattern = f"{folder}/{{{0:05d}..{shards - 1:05d}}}.tar"
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return pattern
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w", format=tarfile.GNU_FORMAT) as t:
            for i in range(s * shard_items, min(items, (s + 1) * shard_items)):
                members = [("jpg", image)] + ([("txt", text.encode())] if text is not None else [])
                for ext, data in members:
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    stamp.write_text(json.dumps(want))
    return pattern


class Server:
    def __init__(self, model: Path, extra: list[str]):
        self.proc = subprocess.Popen(
            # The items are copies: without the content cache, every item costs its preprocessing and forward.
            [str(BIN), "serve", "--model", str(model), "--device", "cpu", "--grpc-addr", "127.0.0.1:0",
             "--http-addr", "127.0.0.1:0", "--cache-mb", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for line in self.proc.stderr:
            m = re.search(r"listening grpc=(\S+) http=(\S+)", line)
            if m:
                self.grpc, self.http = m.group(1), m.group(2)
                break
        else:
            raise SystemExit("the server exited before listening")
        # Keep draining the log so the server never blocks on a full pipe.
        import threading
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://{self.http}/ready", timeout=2).status == 200:
                    return
            except Exception:
                time.sleep(0.2)
        raise SystemExit("the server never became ready")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def bench(servers: list[Server], image: Path, args: argparse.Namespace) -> float:
    procs = []
    for i, s in enumerate(servers):
        out = ROOT / f"target/bulk-bench/bench-{i}.json"
        procs.append((out, subprocess.Popen(
            [str(BIN), "bench", "--server", f"http://{s.grpc}", "--stream", "--kind", "image", "--image", str(image),
             "--items", str(args.batch), "--window", str(args.bench_window), "--concurrency",
             str(args.bench_concurrency), "--duration", f"{args.bench_seconds}s", "--warmup", "2s", "--json", str(out)],
            stdout=subprocess.DEVNULL,
        )))
    total = 0.0
    for out, p in procs:
        assert p.wait() == 0, "clipserve bench failed"
        report = json.loads(out.read_text())
        assert report["requests_failed"] == 0, report["errors"]
        total += report["items_per_second"]
    return total


def embed(servers: list[Server], pattern: str, items: int, args: argparse.Namespace) -> dict:
    out = ROOT / "target/bulk-bench/out"
    shutil.rmtree(out, ignore_errors=True)
    cpu_before = [s.cpu_seconds() for s in servers]
    cmd = [str(BIN), "embed", "--no-progress", "--server", ",".join(f"http://{s.grpc}" for s in servers),
           "--input", pattern, "--output", str(out), "--format", "clip-retrieval", "--batch", str(args.batch),
           "--window", str(args.window), *args.embed_flag]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_sampled = 0.0
    log_lines = []
    import threading
    threading.Thread(target=lambda: log_lines.extend(proc.stderr), daemon=True).start()
    # wait4 gives the peak RSS; sampling shows it over the run too.
    samples = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{proc.pid}/status").read_text()).group(1)) / 1024
            samples.append((time.monotonic() - t0, rss))
            peak_sampled = max(peak_sampled, rss)
        except (OSError, AttributeError):
            pass
        time.sleep(0.5)
    wall = time.monotonic() - t0
    assert os.waitstatus_to_exitcode(status) == 0, "".join(log_lines)
    summary = next((l for l in log_lines if l.startswith("embedded ")), "")
    embedded = int(re.match(r"embedded (\d+)", summary).group(1))
    assert embedded == items, f"{embedded} of {items} embedded: {''.join(log_lines)}"
    server_cpu = sum(s.cpu_seconds() - b for s, b in zip(servers, cpu_before))
    client_cpu = usage.ru_utime + usage.ru_stime
    return {
        "items_per_second": items / wall,
        "wall_seconds": wall,
        "client_cpu_us_per_item": client_cpu / items * 1e6,
        "server_cpu_us_per_item": server_cpu / items * 1e6,
        "client_peak_rss_mib": usage.ru_maxrss / 1024,
        "rss_samples_mib": [round(r) for _, r in samples[:: max(1, len(samples) // 20)]],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--shard-items", type=int, default=10_000)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--model", type=Path, default=ROOT / "target/test-models/tiny")
    p.add_argument("--image", type=Path, default=ROOT / "target/test-fixtures/images/landscape_640x480.jpg")
    p.add_argument("--text", default=None, help="a caption for every sample (default: images only)")
    p.add_argument("--batch", type=int, default=16, help="items per message, for both")
    p.add_argument("--window", type=int, default=4, help="clipserve embed --window")
    p.add_argument("--bench-window", type=int, default=8)
    p.add_argument("--bench-concurrency", type=int, default=8)
    p.add_argument("--bench-seconds", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-bench", action="store_true", help="only the embed run (memory on a large input)")
    p.add_argument("--embed-flag", action="append", default=[], help="an extra flag for clipserve embed")
    p.add_argument("--server-flag", action="append", default=[], help="an extra flag for clipserve serve")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    image = args.image.read_bytes()
    print(f"dataset: {args.items} samples of {args.image.name} ({len(image)} bytes)"
          f"{' with a caption' if args.text else ''}, shards of {args.shard_items}", flush=True)
    pattern = make_dataset(ROOT / f"target/bulk-bench/data-{args.items}", args.items, args.shard_items, image, args.text)
    servers = [Server(args.model, args.server_flag) for _ in range(args.servers)]
    rounds = []
    try:
        for r in range(args.rounds):
            b = None if args.no_bench else bench(servers, args.image, args)
            e = embed(servers, pattern, args.items, args)
            e["bench_items_per_second"] = b
            rounds.append(e)
            ratio = f"{e['items_per_second'] / b:.3f}" if b else "-"
            print(f"round {r + 1}: bench {b or 0:.0f} items/s, embed {e['items_per_second']:.0f} items/s "
                  f"(ratio {ratio}); client CPU {e['client_cpu_us_per_item']:.1f} us/item, servers "
                  f"{e['server_cpu_us_per_item']:.1f} us/item; client peak RSS {e['client_peak_rss_mib']:.0f} MiB; "
                  f"RSS over the run {e['rss_samples_mib']}", flush=True)
    finally:
        for s in servers:
            s.stop()
    if not args.no_bench:
        ratios = [e["items_per_second"] / e["bench_items_per_second"] for e in rounds]
        print(f"median ratio embed / bench --stream: {statistics.median(ratios):.3f}")
    cpu = statistics.median(e["client_cpu_us_per_item"] / e["server_cpu_us_per_item"] for e in rounds)
    print(f"median client CPU / server CPU per item: {cpu:.4f}")
    print(f"largest client peak RSS: {max(e['client_peak_rss_mib'] for e in rounds):.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
