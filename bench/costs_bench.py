"""What metrics and rate limits cost the request path, on their own: the proxy benchmark's
paired-rounds phase (see ``proxy_costs``) without the rest of it, in about three minutes.

    .venv/bin/python bench/costs_bench.py [--quick]

Writes bench/results/costs.json and bench/results/costs.md (--quick: under .dev/bench/).
"""

from __future__ import annotations

import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import proxy_bench as pb
import proxy_procs
import proxy_report

from inference_gateway.db.migrate import migrate

from common import ROOT, dev_database_url, scratch_database


def main(argv: list[str]) -> int:
    opts = pb.parse_options(argv)
    tmp = Path(tempfile.mkdtemp(prefix="costs-bench-"))
    database_url = pb.run_async(scratch_database(dev_database_url(), "bench_proxy"))
    pb.run_async(migrate(database_url))
    run = pb.Run(opts, tmp, database_url, f"costs-{time.strftime('%Y%m%d%H%M%S')}-"
                 f"{secrets.token_hex(3)}")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with pb.stopped_on_exit(run):
        fixture = (pb.FIXTURES / "chat_completion.json").read_text()
        backend = run.keep(proxy_procs.start_nginx(
            tmp, "backend", "backend.conf", pb.BACKEND_WORKERS,
            {"FIXTURES": str(pb.FIXTURES), "CHAT_COMPLETION": proxy_procs.nginx_string(fixture)}))
        proxy_procs.wait_http(backend, pb.CHAT_PATH, method="POST",
                              body=pb.JSON_BODY.read_bytes())
        run.results["costs"] = pb.phase("what metrics and rate limits cost, in paired rounds",
                                        run, lambda: pb.costs_phase(run, backend))
    results = {"started": started, "gateway_revision": pb.git_revision(),
               "machine": pb.machine(), "costs": run.results["costs"],
               "checks": pb.evaluate({"costs": run.results["costs"], "targets": {}})}
    checks = [c for c in results["checks"] if c["value"] is not None]
    lines = [f"# What metrics and rate limits cost ({started})", "",
             *proxy_report._costs(results), "", *proxy_report._checks({"targets_check": checks})]
    out = (pb.SCRATCH_RESULTS if opts.quick else pb.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "costs.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "costs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {(out / 'costs.json').relative_to(ROOT)}")
    return 1 if "error" in results["costs"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
