#!/usr/bin/env bash
# Runs the whole test suite from nothing: sets up the virtualenv and the build (deploy/setup.sh), exports the two
# test models (a tiny CLIP and the full-size ViT-B/32 architecture, seeded random weights, each with its Hugging
# Face checkpoint beside it), computes the transformers reference for them, then runs cargo test.
# Extra arguments go to cargo test.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/env.sh"
cd "$CLIPSERVE_ROOT"
CLIPSERVE_SKIP_MODEL=1 deploy/setup.sh

models=target/test-models
fixtures=target/test-fixtures
export_if_stale() {  # name, extra export flags...
  local dir="$models/$1"; shift
  if [ ! -f "$dir/manifest.json" ] || [ deploy/export_model.py -nt "$dir/manifest.json" ]; then
    .venv/bin/python deploy/export_model.py --force --save-hf --out "$dir" "$@"
  fi
}
export_if_stale tiny --tiny
export_if_stale vit-b32 --random-init
if [ ! -f "$fixtures/fixtures.json" ] || [ dev/make_test_fixtures.py -nt "$fixtures/fixtures.json" ] \
   || [ "$models/tiny/manifest.json" -nt "$fixtures/fixtures.json" ] || [ "$models/vit-b32/manifest.json" -nt "$fixtures/fixtures.json" ]; then
  .venv/bin/python dev/make_test_fixtures.py --out "$fixtures" --model "tiny=$models/tiny" --model "vit-b32=$models/vit-b32"
fi
export CLIPSERVE_TEST_FIXTURES="$CLIPSERVE_ROOT/$fixtures"
cargo test --release --locked "$@"
