"""The ``inference-gateway`` command. Each subcommand is a few lines over the modules it names."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

import asyncpg

from inference_gateway.settings import ConfigError, Settings, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]
T = TypeVar("T")


def _with_db(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh connection to the gateway's database."""

    async def run() -> T:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def _when(ts: datetime | None) -> str:
    return "-" if ts is None else f"{ts:%Y-%m-%d %H:%M:%S%z}"


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.server import serve

    return serve(settings)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.db.migrate import prepare_database

    applied = asyncio.run(prepare_database(settings))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.simulator.server import run

    return run(args)


def _spool_status(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.metering.spool import spool_status

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


def _orgs(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.tenants import orgs

    if args.orgs_command == "list":
        rows = _with_db(settings, lambda conn: orgs.list_orgs(conn, args.org))
        print("org_id\tstatus\tlast_updated_at")
        for row in rows:
            status = "allowed" if row["valid"] else "denied"
            print(f"{row['org_id']}\t{status}\t{_when(row['last_updated_at'])}")
        return 0
    allow = args.orgs_command == "allow"
    _with_db(settings, lambda conn: orgs.set_valid(conn, args.org, allow))
    print(f"{args.org}: {'allowed' if allow else 'denied'}")
    return 0


def _keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.tenants import keys

    try:
        key, prefix = _with_db(settings, lambda conn: keys.create_key(conn, args.org,
                                                                         args.instance))
    except ValueError as exc:
        print(f"inference-gateway: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(f"key {prefix} for {args.org}/{args.instance}: store it now, it is not shown again",
          file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.tenants import keys

    rows = _with_db(settings, lambda conn: keys.list_keys(conn, args.org))
    print("prefix\torganization_id\tinstance_id\tcreated_at\tlast_used_at\trevoked_at")
    for row in rows:
        print("\t".join([row["prefix"], row["organization_id"], row["instance_id"],
                         _when(row["created_at"]), _when(row["last_used_at"]),
                         _when(row["revoked_at"])]))
    return 0


def _keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.tenants import keys

    if not _with_db(settings, lambda conn: keys.revoke_key(conn, args.prefix)):
        print(f"inference-gateway: no live key with prefix {args.prefix!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.prefix}")
    return 0


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.billing.reporter import run_once, run_reporter
    from inference_gateway.billing.sinks import open_sink

    try:
        sink = open_sink(settings)
    except ConfigError as exc:
        print(f"inference-gateway: {exc}", file=sys.stderr)
        return 2
    if not args.once:
        asyncio.run(run_reporter(settings, sink))
        return 0

    async def once() -> int:
        try:
            passes = await run_once(settings, sink)
        finally:
            if sink is not None:
                await sink.close()
        if passes is None:
            print("another usage reporter is running; nothing done", file=sys.stderr)
            return 1
        print(f"reported until {passes[-1].reported_until:%Y-%m-%d %H:%M} UTC: "
              f"{sum(p.events for p in passes)} events, "
              f"{sum(p.corrections for p in passes)} corrections, "
              f"{sum(p.messages for p in passes)} messages")
        return 0

    return asyncio.run(once())


def _usage(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.portal import usage_report

    start, end = usage_report.default_range()
    try:
        start = usage_report.parse_time(args.start) if args.start else start
        end = usage_report.parse_time(args.end) if args.end else end
    except ValueError as exc:
        print(f"inference-gateway: --from/--to: {exc}", file=sys.stderr)
        return 2
    rows = _with_db(settings,
                    lambda conn: usage_report.usage(conn, args.org, start, end, args.by))
    print(f"usage of {args.org} from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    print(usage_report.render(rows, args.by))
    return 0


def _add_tenant_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    orgs = sub.add_parser("orgs", help="allow or deny organizations (the org gate)")
    orgs_sub = orgs.add_subparsers(dest="orgs_command", required=True, metavar="COMMAND")
    for name, text in (("allow", "let the organization send requests"),
                       ("deny", "refuse the organization's requests")):
        cmd = orgs_sub.add_parser(name, help=text)
        cmd.add_argument("org", metavar="ORG")
        cmd.set_defaults(handler=_orgs)
    listing = orgs_sub.add_parser("list", help="show organizations and their status")
    listing.add_argument("org", metavar="ORG", nargs="?")
    listing.set_defaults(handler=_orgs)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = keys_sub.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--org", required=True)
    create.add_argument("--instance", required=True)
    create.set_defaults(handler=_keys_create)
    listing = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--org")
    listing.set_defaults(handler=_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("prefix", metavar="PREFIX")
    revoke.set_defaults(handler=_keys_revoke)


def _add_billing_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser("report", help="run the hourly usage reporter for billing")
    report.add_argument("--once", action="store_true",
                        help="report what is due, deliver it, and exit")
    report.set_defaults(handler=_report)

    usage = sub.add_parser("usage", help="print an organization's usage")
    usage.add_argument("--org", required=True)
    usage.add_argument("--from", dest="start", metavar="WHEN",
                       help="ISO date or time, UTC unless given (default: 6 days before today)")
    usage.add_argument("--to", dest="end", metavar="WHEN", help="exclusive (default: now)")
    usage.add_argument("--by", choices=("hour", "day", "model"), default="day")
    usage.set_defaults(handler=_usage)


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

    _add_tenant_commands(sub)
    _add_billing_commands(sub)
    from inference_gateway.db.maintenance import register

    register(sub)
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
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # The database (or a port) is not there: say so in one line, not a traceback.
        print(f"inference-gateway: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
