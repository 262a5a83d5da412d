"""What each subcommand does: a few lines each over the module that does the work.

A handler takes the parsed arguments and the settings and returns the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import asyncpg

from inference_gateway.settings import ConfigError, Settings

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


def _fail(message: str, status: int = 2) -> int:
    print(f"inference-gateway: {message}", file=sys.stderr)
    return status


# -- running ------------------------------------------------------------------------------------


def serve(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.server import serve

    return serve(settings)


def migrate(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.db.migrate import prepare_database

    applied = asyncio.run(prepare_database(settings))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def simulate(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.simulator.server import run

    return run(args)


def spool_status(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.metering.spool_status import spool_status

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


def replicas(args: argparse.Namespace, settings: Settings) -> int:
    """The replica sets of a running gateway, as one of its worker processes sees them."""
    import json
    import urllib.error
    import urllib.request

    from inference_gateway.portal.tables import text_table

    url = args.url or f"http://127.0.0.1:{settings.webserver_port}"
    request = urllib.request.Request(f"{url}/status/replicas")
    if settings.admin_token:
        request.add_header("Authorization", f"Bearer {settings.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return _fail(f"{url} answered {exc.code}: {exc.read().decode(errors='replace')}", 1)
    except OSError as exc:
        return _fail(f"no gateway answers at {url}: {exc}", 1)
    rows = [(model, r["url"], r["state"], r["in_flight"], r["load"], r["running"],
             r["waiting"], f"{r['kv_cache_usage']:.0%}", r["served"], r["errors"])
            for model, replica_list in status["models"].items() for r in replica_list]
    print("\n".join(text_table(
        ("model", "replica", "state", "in flight", "load", "running", "waiting", "kv cache",
         "served", "errors"), rows, right=range(3, 10))))
    for model, names in status["dns"].items():
        print(f"{model}: replicas from {', '.join(names)}")
    return 0


# -- tenants ------------------------------------------------------------------------------------


def orgs(args: argparse.Namespace, settings: Settings) -> int:
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


def keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.tenants import keys

    if args.admin:
        if args.org is not None or args.instance is not None:
            return _fail("an admin key names no organization or instance: leave out --org and "
                         "--instance")
        key, prefix = _with_db(settings, keys.create_admin_key)
        owner = "reading every organization's usage"
    elif args.org is None or args.instance is None:
        return _fail("keys create needs --org and --instance (or --admin)")
    else:
        try:
            key, prefix = _with_db(settings,
                                   lambda conn: keys.create_key(conn, args.org, args.instance))
        except ValueError as exc:
            return _fail(str(exc))
        owner = f"for {args.org}/{args.instance}"
    print(key)
    print(f"key {prefix} {owner}: store it now, it is not shown again", file=sys.stderr)
    return 0


def keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.tenants import keys

    rows = _with_db(settings, lambda conn: keys.list_keys(conn, args.org))
    print("prefix\torganization_id\tinstance_id\tcreated_at\tlast_used_at\trevoked_at\trole")
    for row in rows:
        print("\t".join([row["prefix"], row["organization_id"] or "-", row["instance_id"] or "-",
                         _when(row["created_at"]), _when(row["last_used_at"]),
                         _when(row["revoked_at"]), "admin" if row["is_admin"] else "tenant"]))
    return 0


def keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.tenants import keys

    if not _with_db(settings, lambda conn: keys.revoke_key(conn, args.prefix)):
        return _fail(f"no live key with prefix {args.prefix!r}", 1)
    print(f"revoked {args.prefix}")
    return 0


def limits(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.admission import limits
    from inference_gateway.portal.tables import text_table

    if args.limits_command == "rm":
        if not _with_db(settings, lambda conn: limits.remove_limit(conn, args.id)):
            return _fail(f"no limit with id {args.id}", 1)
        print(f"removed limit {args.id}")
        return 0
    if args.limits_command == "set":
        values = {name: getattr(args, name) for name in limits.SETTABLE
                  if getattr(args, name) is not None}
        if not values:
            return _fail("name at least one limit, e.g. --requests-per-minute 60")
        try:
            found = [_with_db(settings, lambda conn: limits.set_limit(
                conn, args.org, args.instance, args.key, args.model, values))]
        except (ValueError, asyncpg.CheckViolationError) as exc:
            return _fail(str(exc))
    else:
        found = _with_db(settings, lambda conn: limits.list_limits(conn, args.org))
    print("\n".join(text_table(
        ("id", "organization", "instance", "key", "model", "req/min", "tokens/min", "at once",
         "tokens/day", "tokens/month", "weights"),
        [(lim.id, lim.organization_id, lim.instance_id, lim.api_key_id, lim.model,
          lim.requests_per_minute, lim.tokens_per_minute, lim.max_concurrent,
          lim.tokens_per_day, lim.tokens_per_month,
          f"{lim.prompt_weight:g}/{lim.completion_weight:g}") for lim in found],
        right=range(5, 10))))
    return 0


# -- billing and usage --------------------------------------------------------------------------


def report(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.billing.reporter import run_once, run_reporter
    from inference_gateway.billing.sinks import open_sink

    try:
        sink = open_sink(settings)
    except ConfigError as exc:
        return _fail(str(exc))
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
            return _fail("another usage reporter is running; nothing done", 1)
        print(f"reported until {passes[-1].reported_until:%Y-%m-%d %H:%M} UTC: "
              f"{sum(p.events for p in passes)} events, "
              f"{sum(p.corrections for p in passes)} corrections, "
              f"{sum(p.messages for p in passes)} messages")
        return 0

    return asyncio.run(once())


def usage(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.portal import usage_report

    start, end = usage_report.default_range()
    try:
        start = usage_report.parse_time(args.start) if args.start else start
        end = usage_report.parse_time(args.end) if args.end else end
    except ValueError as exc:
        return _fail(f"--from/--to: {exc}")
    rows = _with_db(settings,
                    lambda conn: usage_report.usage(conn, args.org, start, end, args.by))
    print(f"usage of {args.org} from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    print(usage_report.render(rows, args.by))
    return 0


# -- partition maintenance ----------------------------------------------------------------------


def maintenance_run(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.db.maintenance import run_maintenance_now

    try:
        results = asyncio.run(run_maintenance_now(
            settings.database_url, parallel=args.parallel, schemas=args.schema,
            parent_table=args.table, on_notice=print))
    except asyncpg.PostgresError as exc:
        return _fail(f"partition maintenance failed: {exc}", 1)
    if not results:
        print("no partition set was selected")
    for result in results:
        print(result.describe())
    return 1 if any(r.status == "failed" for r in results) else 0


def maintenance_status(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.db.maintenance import maintenance_state
    from inference_gateway.portal.maintenance_report import render

    state = asyncio.run(maintenance_state(settings.database_url, limit=args.limit,
                                          exact=args.exact))
    print("\n".join(render(state)))
    return 0


def maintenance_schedule(args: argparse.Namespace, settings: Settings) -> int:
    from inference_gateway.db import leader
    from inference_gateway.db.schedule import maintenance_job

    try:
        job = maintenance_job(settings.database_url, settings.maintenance_schedule)
    except ValueError as exc:
        return _fail(f"invalid MAINTENANCE_SCHEDULE: {exc}")
    print(f"partition maintenance on {settings.maintenance_schedule} (GMT), in one process of "
          "the fleet, while no active pg_cron job does it; Ctrl-C to stop")
    asyncio.run(leader.run(settings.database_url, job))
    return 0
