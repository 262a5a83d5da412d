"""``inference-gateway maintenance status``: the scheduler, the latest runs and the partitions."""

from __future__ import annotations

from inference_gateway.db.maintenance import MaintenanceState
from inference_gateway.portal.tables import text_table


def size(num: int | None) -> str:
    """Bytes as a person reads them: 512 B, 1.5 kB, 3.2 GB."""
    if num is None:
        return "-"
    value = float(num)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def _when(value: object) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S%z}"


def render(state: MaintenanceState) -> list[str]:
    lines: list[str] = []
    setting, last = state.setting, state.last
    if setting is not None:
        lines.append(f"scheduler:   {setting['scheduler']} - {setting['scheduler_detail']}")
        lines.append(f"schedule:    {setting['schedule']} (GMT); warning above "
                     f"{setting['warn_after_sec']} s")
    for job in state.jobs:
        mark = "maintenance job" if job["is_maintenance_job"] else "other job"
        lines.append(
            f"pg_cron:     job {job['jobid']} ({mark}, {job['jobname']}), {job['schedule']}, "
            f"{'active' if job['active'] else 'inactive'}; last run: "
            f"{job['last_status'] or 'never'}"
            + (f" at {_when(job['last_start'])}" if job["last_start"] else "")
            + (f" ({job['last_message']})" if job["last_message"] else ""))
    if last is not None:
        lines.append(
            f"last run:    {last['function_name']} on {last['parent_table'] or 'every set'}: "
            f"{last['status']} at {_when(last['started_at'])}, "
            f"{float(last['duration_sec']):.3f} s"
            + (f" - {last['detail']}" if last["detail"] else ""))
    lines += ["", "maintenance_performance_analysis (latest days):"]
    lines += text_table(
        ("function", "day", "runs", "avg s", "max s", "min s", "created", "dropped",
         "rows moved", "skipped", "failed"),
        [(r["function_name"], r["day"], r["executions"], r["avg_seconds"], r["max_seconds"],
          r["min_seconds"], r["partitions_created"], r["partitions_dropped"], r["rows_moved"],
          r["skipped"], r["failed"]) for r in state.analysis])
    counted = "exact" if state.exact else "estimated"
    lines += ["", f"partitions ({counted} row counts):"]
    lines += text_table(
        ("parent", "partition", "from", "to", "rows", "size"),
        [(p["parent_table"], p["partition_name"],
          "DEFAULT" if p["is_default"] else p["range_from"], p["range_to"],
          f"{p['row_count']}" + ("" if p["row_count_exact"] else " (est.)"),
          size(p["total_bytes"])) for p in state.partitions])
    return lines
