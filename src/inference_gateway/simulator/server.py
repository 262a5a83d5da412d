"""``inference-gateway simulate``: run the simulator on a port."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import fields

from aiohttp import web

from inference_gateway.simulator.app import create_app
from inference_gateway.simulator.config import SimConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="served model name (repeatable; default facebook/opt-125m)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    parser.add_argument("--tpot-ms", type=float, default=0.0, help="time per output token")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--default-max-tokens", type=int, default=16)
    parser.add_argument("--error-rate", type=float, default=0.0,
                        help="fraction of requests answered with a 500")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                        dest="prompt_tokens_details",
                        help="as vLLM's flag: usage reports cached prompt tokens")
    parser.add_argument("--enable-store", action="store_true",
                        help="as vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1: keep responses, "
                        "allow background ones")
    parser.add_argument("--store-size", type=int, default=10_000,
                        help="responses the store keeps, oldest dropped first")
    parser.add_argument("--block-size", type=int, default=16,
                        help="prefix-cache block size in tokens (vLLM on CPUs uses 128)")
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--check-content-type", action="store_true",
                        help="refuse bodies not sent as application/json, as vLLM does")
    parser.add_argument("--max-num-seqs", type=int, default=256,
                        help="as vLLM's flag: sequences generated at once; the rest wait")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=8192, metavar="N",
                        dest="kv_blocks",
                        help="as vLLM's flag: KV-cache blocks (of --block-size tokens) that "
                        "running requests fill")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The options whose names are the configuration's fields (``--model`` gathers ``models``)."""
    names = {f.name for f in fields(SimConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return SimConfig(**given)


def run(args: argparse.Namespace) -> int:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    # A client that leaves cancels its handler, so its request stops generating and frees its
    # place, as vLLM aborts the request of a client that has gone.
    web.run_app(create_app(config_from_args(args)), host=args.host, port=args.port,
                access_log=None, print=None, handler_cancellation=True)
    return 0
