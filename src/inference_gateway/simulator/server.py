"""``inference-gateway simulate``: run the simulator on a port."""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from inference_gateway.simulator.app import SimConfig, create_app


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


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        models=args.models or ["facebook/opt-125m"],
        ttft_ms=args.ttft_ms,
        tpot_ms=args.tpot_ms,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        error_rate=args.error_rate,
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass
    web.run_app(create_app(config_from_args(args)), host=args.host, port=args.port,
                access_log=None, print=None)
    return 0
