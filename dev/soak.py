#!/usr/bin/env python3
"""Soak test: mixed load against one clipserve process for a set time, loopback only.

Starts `clipserve serve` on a model directory, then, in intervals, runs at once:
  - `clipserve bench` with images over unary Embed (concurrency 8),
  - `clipserve bench` with texts over EmbedStream (concurrency 4, window 8),
  - HTTP /score calls, one in five with a corrupt image row (a 400 is the expected answer),
and prints for each interval the images/s, texts/s, answers by code, and the server's resident memory (RSS).
Ends with RSS at start (after warm-up) and end, and the growth in percent.

    .venv/bin/python dev/soak.py --minutes 10 [--model target/test-models/vit-b32]
"""

import argparse
import base64
import collections
import json
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import Server, make_jpeg, run_json as bench  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def http_load(url: str, jpeg_b64: str, seconds: float, codes: collections.Counter) -> None:
    """Sequential /score calls; every fifth carries a corrupt image row."""
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        bad = n % 5 == 4
        rows = [[jpeg_b64, "a caption"], ["bm90IGFuIGltYWdl" if bad else "", "another caption"]]
        body = json.dumps({"input_data": {"columns": ["image", "text"], "data": rows}}).encode()
        req = urllib.request.Request(url, body, {"content-type": "application/json"})
        try:
            codes[f"http {urllib.request.urlopen(req, timeout=60).status}"] += 1
        except urllib.error.HTTPError as e:
            codes[f"http {e.code}"] += 1
        except Exception as e:  # connection problems are findings too
            codes[f"http {type(e).__name__}"] += 1
        n += 1


def code_of(error: str) -> str:
    return error.split(":", 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "target" / "test-models" / "vit-b32")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=30.0, help="seconds per reported interval")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the starting RSS is taken")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="clipserve-soak-"))
    jpeg = work / "640x480.jpg"
    make_jpeg(jpeg)
    jpeg_b64 = base64.b64encode(jpeg.read_bytes()).decode()
    server = Server(args.model, "cpu", ["--cache-mb", "0"])  # the load repeats its inputs
    pid = server.proc.pid
    url = f"http://{server.http}/score"
    total = collections.Counter()
    rows = []

    def interval(seconds: float) -> dict:
        codes: collections.Counter = collections.Counter()
        secs = f"{seconds}s"
        results = {}
        threads = [
            threading.Thread(target=lambda: results.__setitem__("image", bench(
                ["--server", f"http://{server.grpc}", "--kind", "image", "--image", str(jpeg), "--concurrency", "8",
                 "--duration", secs, "--warmup", "0s"]))),
            threading.Thread(target=lambda: results.__setitem__("text", bench(
                ["--server", f"http://{server.grpc}", "--kind", "text", "--stream", "--window", "8",
                 "--concurrency", "4", "--duration", secs, "--warmup", "0s"]))),
            threading.Thread(target=http_load, args=(url, jpeg_b64, seconds, codes)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for kind in ("image", "text"):
            r = results[kind]
            codes[f"grpc {kind} OK"] += r["requests_ok"]
            for e in r["errors"]:
                codes[f"grpc {kind} {code_of(e)}"] += 1
            if r["requests_failed"] > len(r["errors"]):
                codes[f"grpc {kind} failed (unlisted)"] += r["requests_failed"] - len(r["errors"])
        return {"image_per_s": results["image"]["items_per_second"], "text_per_s": results["text"]["items_per_second"],
                "codes": codes, "rss": rss_mib(pid)}

    try:
        print(f"warm-up {args.warmup:.0f}s ...", file=sys.stderr, flush=True)
        interval(args.warmup)
        rss_start = rss_mib(pid)
        start = time.time()
        print(f"{'t (s)':>6} {'img/s':>7} {'text/s':>7} {'RSS MiB':>8}  answers")
        while time.time() - start < args.minutes * 60:
            r = interval(args.interval)
            total.update(r["codes"])
            rows.append(r)
            print(f"{time.time() - start:6.0f} {r['image_per_s']:7.1f} {r['text_per_s']:7.1f} {r['rss']:8.0f}  "
                  f"{dict(sorted(r['codes'].items()))}", flush=True)
        rss_end = rss_mib(pid)
    finally:
        server.stop()
    growth = 100 * (rss_end - rss_start) / rss_start
    print(f"\nanswers by code over {args.minutes:g} min: {dict(sorted(total.items()))}")
    print(f"RSS after warm-up {rss_start:.0f} MiB, at end {rss_end:.0f} MiB: growth {growth:+.1f}%"
          f" ({'within' if growth < 10 else 'OVER'} the 10% budget)")
    unexpected = {k: v for k, v in total.items() if not (k.endswith(" OK") or k in ("http 200", "http 400"))}
    if unexpected:
        print(f"unexpected answers: {unexpected}")
    sys.exit(1 if growth >= 10 or unexpected else 0)


if __name__ == "__main__":
    main()
