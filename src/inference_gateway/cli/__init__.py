"""The ``inference-gateway`` command: every subcommand and its options, in one place.

What each one does is in ``commands``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import asyncpg

from inference_gateway.cli import commands
from inference_gateway.settings import ConfigError, Settings, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]
if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _tenant_commands(sub: Subparsers) -> None:
    orgs = sub.add_parser("orgs", help="allow or deny organizations (the org gate)")
    orgs_sub = orgs.add_subparsers(dest="orgs_command", required=True, metavar="COMMAND")
    for name, text in (("allow", "let the organization send requests"),
                       ("deny", "refuse the organization's requests")):
        cmd = orgs_sub.add_parser(name, help=text)
        cmd.add_argument("org", metavar="ORG")
        cmd.set_defaults(handler=commands.orgs)
    listing = orgs_sub.add_parser("list", help="show organizations and their status")
    listing.add_argument("org", metavar="ORG", nargs="?")
    listing.set_defaults(handler=commands.orgs)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = keys_sub.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--org", help="the organization the key names (all but --admin)")
    create.add_argument("--instance", help="the instance the key names (all but --admin)")
    create.add_argument("--admin", action="store_true",
                        help="a key that reads every organization's usage and sends no requests")
    create.set_defaults(handler=commands.keys_create)
    listing = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--org")
    listing.set_defaults(handler=commands.keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("prefix", metavar="PREFIX")
    revoke.set_defaults(handler=commands.keys_revoke)


def _limit_commands(sub: Subparsers) -> None:
    parser = sub.add_parser("limits", help="rate limits and token quotas")
    cmds = parser.add_subparsers(dest="limits_command", required=True, metavar="COMMAND")
    setter = cmds.add_parser("set", help="set limits of an organization, instance or key "
                             "(optionally for one model); unnamed limits stay as they are")
    setter.add_argument("--org", required=True)
    subject = setter.add_mutually_exclusive_group()
    subject.add_argument("--instance", help="this instance of the organization only")
    subject.add_argument("--key", metavar="PREFIX", help="this API key only (its prefix)")
    setter.add_argument("--model", help="this model only (default: every model)")
    for name, kind, text in (
            ("requests-per-minute", int, "requests in any 60 seconds"),
            ("tokens-per-minute", int, "tokens in any 60 seconds"),
            ("max-concurrent", int, "requests under way at once"),
            ("tokens-per-day", int, "tokens per UTC day"),
            ("tokens-per-month", int, "tokens per calendar month (UTC)"),
            ("prompt-weight", float, "what a prompt token counts (default 1)"),
            ("completion-weight", float, "what a generated token counts (default 1)")):
        setter.add_argument(f"--{name}", type=kind, help=text)
    setter.set_defaults(handler=commands.limits)
    listing = cmds.add_parser("list", help="show the limits")
    listing.add_argument("--org")
    listing.set_defaults(handler=commands.limits)
    remove = cmds.add_parser("rm", help="remove a limit by its id")
    remove.add_argument("id", type=int)
    remove.set_defaults(handler=commands.limits)


def _billing_commands(sub: Subparsers) -> None:
    report = sub.add_parser("report", help="run the hourly usage reporter for billing")
    report.add_argument("--once", action="store_true",
                        help="report what is due, deliver it, and exit")
    report.set_defaults(handler=commands.report)

    usage = sub.add_parser("usage", help="print an organization's usage")
    usage.add_argument("--org", required=True)
    usage.add_argument("--from", dest="start", metavar="WHEN",
                       help="ISO date or time, UTC unless given (default: 6 days before today)")
    usage.add_argument("--to", dest="end", metavar="WHEN", help="exclusive (default: now)")
    usage.add_argument("--by", choices=("hour", "day", "model"), default="day")
    usage.set_defaults(handler=commands.usage)


def _maintenance_commands(sub: Subparsers) -> None:
    parser = sub.add_parser("maintenance", help="partition maintenance of the audit table")
    maint = parser.add_subparsers(dest="maintenance_command", required=True, metavar="COMMAND")
    run = maint.add_parser("run", help="run partition maintenance now and print what it did")
    run.add_argument("--parallel", type=int, metavar="N", default=None,
                     help="maintain the partition sets on N connections at once "
                          "(parallel_run_maintenance)")
    run.add_argument("--schema", action="append", metavar="SCHEMA", default=None,
                     help="with --parallel: a schema holding parent tables, or pg_partman's "
                          "schema for all sets (repeatable; default: all sets)")
    run.add_argument("--table", metavar="SCHEMA.TABLE", default=None,
                     help="without --parallel: maintain only this partition set")
    run.set_defaults(handler=commands.maintenance_run)
    status = maint.add_parser(
        "status", help="latest maintenance runs, the scheduler, and the partitions with sizes")
    status.add_argument("--limit", type=int, default=14, help="rows of the analysis view")
    status.add_argument("--exact", action="store_true", help="count rows instead of estimating")
    status.set_defaults(handler=commands.maintenance_status)
    maint.add_parser(
        "schedule", help="run maintenance on MAINTENANCE_SCHEDULE (GMT) where pg_cron does not",
    ).set_defaults(handler=commands.maintenance_schedule)


def build_parser() -> argparse.ArgumentParser:
    from inference_gateway.simulator.server import add_arguments

    parser = argparse.ArgumentParser(
        prog="inference-gateway",
        description="OpenAI-compatible gateway in front of vLLM that meters tokens into Postgres.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the gateway").set_defaults(handler=commands.serve)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(
        handler=commands.migrate)
    sim = sub.add_parser("simulate", help="run a vLLM-compatible simulator for tests and benches")
    add_arguments(sim)
    sim.set_defaults(handler=commands.simulate)
    replicas = sub.add_parser("replicas", help="the model servers of a running gateway and "
                              "their state (ADMIN_TOKEN, or from the same host)")
    replicas.add_argument("--url", help="the gateway (default: this host's WEBSERVER_PORT)")
    replicas.set_defaults(handler=commands.replicas)
    spool = sub.add_parser("spool", help="inspect the local usage spool")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True, metavar="COMMAND")
    spool_sub.add_parser("status", help="pending records, bytes, age, dead letters").set_defaults(
        handler=commands.spool_status)
    _tenant_commands(sub)
    _limit_commands(sub)
    _billing_commands(sub)
    _maintenance_commands(sub)
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
    except ConfigError as exc:  # a setting only the command's own work checks
        print(f"inference-gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # The database (or a port) is not there: say so in one line, not a traceback.
        print(f"inference-gateway: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
