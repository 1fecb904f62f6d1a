#!/usr/bin/env bash
# Sets clipserve up on a fresh machine: nasm (the assembler of libjpeg-turbo's SIMD code; installed with apt-get
# when missing and running as root on Debian/Ubuntu), the Python virtualenv (.venv: torch 2.11.0, whose libtorch
# the server links, transformers, pillow, numpy, pyarrow, grpcio, openai, mlflow-skinny with pandas and scipy for
# the tests of MLflow's client, and open_clip_torch for CLIP's BPE vocabulary), the release binary, and the default
# model in models/clip-vit-base-patch32. Idempotent: a second run reuses what exists.
#
#   deploy/setup.sh                   everything
#   CLIPSERVE_SKIP_MODEL=1 deploy/setup.sh   no default model export (the tests export their own)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CLIPSERVE_ROOT"

log() { echo "[setup] $*" >&2; }

if ! command -v cargo >/dev/null; then
  log "cargo not found: install Rust (https://rustup.rs) first"; exit 1
fi
# Without nasm the JPEG decoder would still build, silently without its SIMD code and several times slower.
if ! command -v nasm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing nasm (apt-get), the assembler of libjpeg-turbo's SIMD code"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nasm >/dev/null
  else
    log "nasm not found: install it first (Debian/Ubuntu: sudo apt-get install nasm; Fedora: sudo dnf install nasm)"
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  log "creating the virtualenv .venv"
  python3 -m venv .venv
fi
stamp=.venv/.clipserve-requirements
if ! cmp -s deploy/requirements.txt "$stamp"; then
  log "installing Python packages (torch is a large download the first time)"
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r deploy/requirements.txt
  # Only its data file (CLIP's BPE vocabulary) is used; its dependencies would move torch.
  .venv/bin/pip install --quiet --no-deps open_clip_torch==3.3.0
  cp deploy/requirements.txt "$stamp"
fi

log "building target/release/clipserve"
cargo build --release --locked --quiet

if [ "${CLIPSERVE_SKIP_MODEL:-0}" != 1 ]; then
  model="${CLIPSERVE_MODEL_DIR:-models/clip-vit-base-patch32}"
  if [ ! -f "$model/manifest.json" ]; then
    log "exporting ${CLIPSERVE_MODEL_ID:-openai/clip-vit-base-patch32} to $model"
    .venv/bin/python deploy/export_model.py --model "${CLIPSERVE_MODEL_ID:-openai/clip-vit-base-patch32}" --out "$model"
  fi
  log "model: $model ($(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['weights'])" "$model/manifest.json"))"
fi
