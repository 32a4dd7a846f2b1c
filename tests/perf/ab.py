"""A/B of Keygate builds against nginx_gw, in alternating runs: bench.py's parts, builds given as venvs.

Usage (from the repository root; each VENV has a build of Keygate installed, e.g. the compiled one)::

    .venv/bin/python tests/perf/ab.py base=/tmp/venv-a other=/tmp/venv-b[,KEYGATE_X=V ...] [--rounds 3]

One upstream nginx and one nginx_gw (bench.py's) serve every build; each round runs wrk against
nginx_gw, then each build in the order given (``-t1 -c64 -d10`` by default, bench.py's warm-up and
CPU accounting). It prints every run, then per build the median over rounds of its CPU per request
and, measured in the same round, its CPU, throughput and p99 as multiples of nginx_gw's: two builds
a few percent apart are told apart by many rounds of this, not by two separate bench.py runs on a
machine whose speed drifts. A build's ``NAME=VALUE`` pairs after commas go into its environment
(``KEYGATE_...`` settings, say). Builds made for measuring only are what this is for: it is not
the issue's method (``bench.py``), whose figures are the ones to report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=VENV[,ENV=VALUE...]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    builds = []
    for spec in args.builds:
        name, _, rest = spec.partition("=")
        venv, *pairs = rest.split(",")
        if not name or not venv or not (Path(venv) / "bin" / "keygate").exists():
            parser.error(f"{spec!r}: want NAME=VENV with VENV/bin/keygate")
        builds.append((name, venv, dict(pair.split("=", 1) for pair in pairs)))
    wrk = bench.parse_args(["--threads", "1", "--connections", str(args.connections),
                            "--duration", str(args.duration)])

    def body(procs: bench.Processes, folder: Path) -> int:
        nginx = bench.start_nginx(procs, folder)
        targets = []
        for name, venv, env in builds:
            bench.KEYGATE = f"{venv}/bin/keygate"
            targets.append(bench.start_keygate(procs, folder, nginx.url, 1, name=name, extra_env=env))
        gw = bench.start_nginx_gw(procs, folder, nginx.url, targets[0].key or "")
        targets.insert(0, gw)
        for target in targets:
            bench.check_target(target)
        ours = sorted({pid for target in [*targets, nginx] for pid in target.all_pids})
        runs: dict[str, list[bench.WrkResult]] = {target.name: [] for target in targets}
        for round_no in range(1, args.rounds + 1):
            for target in targets:
                run = bench.measure(procs, target, round_no, wrk, ours)
                runs[target.name].append(run)
                print(f"round {round_no} {target.name:<12} {run.requests_per_s:8.0f} req/s  p99 {run.p99_ms:6.2f} ms  "
                      f"cpu {run.cpu_us_per_request:6.1f} us/req  other {run.other_load_pct:3.0f}%"
                      + ("  DISTURBED" if run.disturbed else ""), flush=True)
                time.sleep(bench.RECORDER_FLUSH + 0.5 if target.flushes else 1.0)
        anchor = runs[gw.name]
        for name, mine in runs.items():
            def ratio(field: str) -> float:
                return statistics.median(getattr(m, field) / getattr(a, field) for m, a in zip(mine, anchor))
            print(f"{name:<12} cpu {statistics.median(m.cpu_us_per_request for m in mine):6.1f} us/req   x nginx_gw: "
                  f"cpu {ratio('cpu_us_per_request'):.3f}  throughput {ratio('requests_per_s'):.3f}  "
                  f"p99 {ratio('p99_ms'):.3f}")
        bench.print_records(targets)  # (a build that drops records under the load looks faster than it is)
        return 0

    return bench.run_with_processes("keygate-ab", False, body)


if __name__ == "__main__":
    sys.exit(main())
