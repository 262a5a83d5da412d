"""``GET /metrics``: vLLM 0.32's Prometheus text for what a balancer and a meter read from it.

Names, HELP texts, types and labels (``engine``, then ``model_name``) are vLLM's, and each
counter comes with its ``_created`` gauge, as the Prometheus client writes them. Each served
model is an engine of its own (``engine="0"``), with its own counters and scheduler.

The counters count what vLLM's do (measured on 0.32): the prompt once per sequence, so a
36-token prompt with ``n`` = 3 adds 108 to ``vllm:prompt_tokens_total`` where ``usage`` says
36; every prompt token is a prefix-cache query and every cached one a hit; generated tokens
as they are made, so an abandoned stream counts what was generated before the client left.
A pooling request counts its prompt (what its ``usage`` reports) and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from inference_gateway.simulator.load import Scheduler

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
GAUGES = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
}
COUNTERS = {  # in the order vLLM writes them
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:generation_tokens": "Number of generation tokens processed.",
}


@dataclass
class Core:
    """One served model's engine: its scheduler and what it has counted."""

    scheduler: Scheduler
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def prefill(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.counts["vllm:prefix_cache_queries"] += prompt_tokens
        self.counts["vllm:prefix_cache_hits"] += cached_tokens
        self.counts["vllm:prompt_tokens"] += prompt_tokens

    def generated(self, tokens: int) -> None:
        self.counts["vllm:generation_tokens"] += tokens

    def gauges(self) -> dict[str, float]:
        scheduler = self.scheduler
        return {"vllm:num_requests_running": scheduler.running_seqs,
                "vllm:num_requests_waiting": scheduler.waiting_seqs,
                "vllm:kv_cache_usage_perc": scheduler.usage()}


def number(value: float) -> str:
    """A sample value as the Prometheus client writes it (Go's notation for large ones)."""
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6 and "e" not in text:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return text


def _labels(model: str) -> str:
    escaped = model.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'{{engine="0",model_name="{escaped}"}}'


def _family(name: str, kind: str, text: str, values: Mapping[str, float]) -> Iterator[str]:
    yield f"# HELP {name} {text}"
    yield f"# TYPE {name} {kind}"
    for model, value in values.items():
        yield f"{name}{_labels(model)} {number(value)}"


def exposition(cores: Mapping[str, Core], created: float) -> str:
    """The text ``GET /metrics`` answers with."""
    lines: list[str] = []
    gauges = {model: core.gauges() for model, core in cores.items()}
    for name, text in GAUGES.items():
        lines += _family(name, "gauge", text, {m: g[name] for m, g in gauges.items()})
    for name, text in COUNTERS.items():
        lines += _family(f"{name}_total", "counter", text,
                         {m: core.counts[name] for m, core in cores.items()})
        lines += _family(f"{name}_created", "gauge", text, dict.fromkeys(cores, created))
    return "\n".join(lines) + "\n"
