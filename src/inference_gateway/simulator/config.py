"""What a simulator run is told at start-up: models, timing, limits and vLLM's server flags."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SimConfig:
    models: list[str] = field(default_factory=lambda: ["facebook/opt-125m"])
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    max_model_len: int = 2048
    default_max_tokens: int = 16
    error_rate: float = 0.0
    embedding_dim: int = 16
    # vLLM's --enable-prompt-tokens-details: usage says how much of the prompt was cached.
    prompt_tokens_details: bool = False
    # vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1: responses are kept, and may run in background.
    enable_store: bool = False
    store_size: int = 10_000  # responses kept, oldest dropped first (vLLM never drops any)
    block_size: int = 16  # tokens per prefix-cache block (vLLM's default on GPUs; 128 on CPUs)
    cache_blocks: int = 65_536  # prefix-cache blocks remembered
    # The load model (see ``load``): vLLM's --max-num-seqs, and the KV cache's size in blocks
    # (vLLM's --num-gpu-blocks-override), which running requests fill.
    max_num_seqs: int = 256
    kv_blocks: int = 8192
    # vLLM refuses a body whose Content-Type is not application/json; off by default so that
    # clients written for the older simulator keep working.
    check_content_type: bool = False
