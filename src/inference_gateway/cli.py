"""The ``inference-gateway`` command. Each subcommand is a few lines over the modules it names."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from inference_gateway.config import ConfigError, Settings, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.server import serve

    return serve(settings)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.migrate import migrate

    applied = asyncio.run(migrate(settings.database_url))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.simulator.server import run

    return run(args)


def _spool_status(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.spool import spool_status

    status = spool_status(settings.spool_dir)
    age = status.oldest_pending_age_sec
    print(f"spool directory:   {settings.spool_dir}")
    print(f"segments:          {status.segments}")
    print(f"pending records:   {status.pending_records}")
    print(f"pending bytes:     {status.pending_bytes}")
    print(f"oldest pending:    {'-' if age is None else f'{age:.1f} s ago'}")
    print(f"dead letters:      {status.dead_letters}")
    print(f"torn tails:        {status.torn}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-gateway",
        description="OpenAI-compatible gateway in front of vLLM that meters tokens into Postgres.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", help="run the gateway").set_defaults(handler=_serve)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(handler=_migrate)

    sim = sub.add_parser("simulate", help="run a vLLM-compatible simulator for tests and benches")
    from inference_gateway.simulator.server import add_arguments

    add_arguments(sim)
    sim.set_defaults(handler=_simulate)

    spool = sub.add_parser("spool", help="inspect the local usage spool")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True, metavar="COMMAND")
    spool_sub.add_parser("status", help="pending records, bytes, age, dead letters").set_defaults(
        handler=_spool_status
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"inference-gateway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
