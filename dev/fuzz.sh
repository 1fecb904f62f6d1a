#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets) for a set time and reports executions and findings.
# Not part of CI. Usage: dev/fuzz.sh [SECONDS_PER_TARGET (default 120)] [TARGET...]
# Needs the project set up (deploy/setup.sh) and cargo-fuzz (installed here if missing). cargo-fuzz needs
# nightly-only compiler flags; with the stable toolchain RUSTC_BOOTSTRAP=1 allows them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/env.sh"
cd "$CLIPSERVE_ROOT"
seconds="${1:-120}"; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(image_preprocess base64_decode score_parse)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
# The fuzz binaries link libtorch (through the clipserve library) without the server binary's rpath.
LD_LIBRARY_PATH="$(.venv/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
# Seed the image target with the test images when they exist (dev/test.sh makes them), and with hostile
# shapes: one side a single pixel on every format, and a progressive JPEG whose last scan repeats (a scan bomb).
mkdir -p fuzz/corpus/image_preprocess
if [ -d target/test-fixtures/images ]; then
  cp -n target/test-fixtures/images/* fuzz/corpus/image_preprocess/ 2>/dev/null || true
fi
.venv/bin/python - fuzz/corpus/image_preprocess <<'PY'
import io, sys
from PIL import Image
out = sys.argv[1]
def save(name, img, fmt, **kw):
    buf = io.BytesIO(); img.save(buf, format=fmt, **kw)
    if buf.tell() <= 262144:
        open(f"{out}/hostile_{name}", "wb").write(buf.getvalue())
    return buf.getvalue()
for w, h in [(1, 60000), (60000, 1), (2, 30000), (30000, 2)]:
    img = Image.new("RGB", (w, h), (120, 30, 200))
    save(f"{w}x{h}.png", img, "PNG"); save(f"{w}x{h}.gif", img.convert("P"), "GIF")
    save(f"{w}x{h}.bmp", img, "BMP"); save(f"{w}x{h}.jpg", img, "JPEG")
    if max(w, h) <= 16383:
        save(f"{w}x{h}.webp", img, "WEBP", lossless=True)
jpeg = save("progressive.jpg", Image.new("RGB", (1024, 1024), (90, 90, 90)), "JPEG", progressive=True)
sos, eoi = jpeg.rfind(b"\xff\xda"), len(jpeg) - 2
open(f"{out}/hostile_scan_bomb.jpg", "wb").write(jpeg[:eoi] + jpeg[sos:eoi] * 500 + b"\xff\xd9")
PY
status=0
for t in "${targets[@]}"; do
  log="fuzz/$t.log"
  echo "== $t: ${seconds}s"
  # -rss_limit_mb: libtorch is linked in; -max_len: big enough for real images.
  if cargo fuzz run --release "$t" -- -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=262144 \
       -print_final_stats=1 >"$log" 2>&1; then
    echo "   no crash; $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') executions," \
         "$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}')/s," \
         "corpus $(ls "fuzz/corpus/$t" 2>/dev/null | wc -l) inputs"
  else
    status=1
    echo "   FINDING: see $log and fuzz/artifacts/$t/"
    grep -E 'panicked|ERROR: AddressSanitizer|deadly signal|out-of-memory|timeout' "$log" | head -5 | sed 's/^/   /'
  fi
done
exit $status
