# Sourced by the scripts in deploy/ and dev/: the project virtualenv provides python and libtorch (tch's LIBTORCH_USE_PYTORCH).
CLIPSERVE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VIRTUAL_ENV="$CLIPSERVE_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# Offline machines: do not let the hub client retry for minutes (the export script probes the hub itself).
export HF_HUB_DISABLE_TELEMETRY=1
