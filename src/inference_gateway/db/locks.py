"""Every advisory lock key the gateway takes, in one place, so that no two uses collide.

Session-level locks, taken from Python (a process holds one for as long as its connection
lives):

* ``MIGRATIONS``: migrations run one process at a time (waits);
* ``MAINTENANCE_SCHEDULER``: the process that runs partition maintenance where pg_cron does not;
* ``BILLING_REPORTER``: the process that reports usage for billing;
* ``USAGE_ROLLUPS``: the process that keeps the usage rollups up to date;
* ``QUOTA_RECONCILER``: the process that brings quota counters in Redis up to Postgres.

Transaction-level locks taken inside SQL (``0002_maintenance.sql``), with try-lock only:
``hashtext('inference_gateway partition maintenance')`` (one of our maintenance runs at a
time), and pg_partman's own ``hashtext('pg_partman run_maintenance')`` and
``hashtext('pg_partman drop_partition_time')``, so that our runs never overlap pg_partman's.
"""

from __future__ import annotations

MIGRATIONS = 0x1A7E6A7E
MAINTENANCE_SCHEDULER = 0x1A7E6A80
BILLING_REPORTER = 0x1A7E6A90
USAGE_ROLLUPS = 0x1A7E6AA0
QUOTA_RECONCILER = 0x1A7E6AB0
