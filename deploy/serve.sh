#!/usr/bin/env bash
# Sets up what is missing (deploy/setup.sh), then serves the default model (openai/clip-vit-base-patch32) over
# gRPC on 0.0.0.0:50051. Extra arguments go to `clipserve serve` (see `clipserve serve --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CLIPSERVE_ROOT"
deploy/setup.sh
exec target/release/clipserve serve --model "${CLIPSERVE_MODEL_DIR:-models/clip-vit-base-patch32}" "$@"
