"""Benchmark: a phantom cohort classified with the report, in 1 process and in N worker processes, same run.

Generates a phantom cohort (default 20 cases), then runs `classify --dataset` as a fresh command
(model load, one offscreen Slicer application per process for the report tiles) once per worker
count, alternating the order over the repeats, and reports cases per minute for each and the speed-up
against the 1-worker run of the same run. The outputs must be identical: nodes.csv byte for byte
and summary.json equal (checked; a difference fails the benchmark).
Run: `python bench/bench_cohort.py [--cases 20] [--seed S] [--workers 1 2] [--repeats 1] [--no-report]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIB_PARENT = Path(__file__).resolve().parents[1] / "LymphNodeClassifier"


def command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "LymphNodeClassifierLib", *arguments]


def run(arguments: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(LIB_PARENT), os.environ.get("PYTHONPATH", "")) if p))
    start = time.perf_counter()
    done = subprocess.run(arguments, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(arguments)}\n{done.stderr.strip()[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--work", help="folder for the cohort and outputs (default: a new temporary folder)")
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lnc-bench-cohort-"))
    dataset = work / "dataset"
    if not (dataset / "dataset.json").is_file():
        run(command("phantoms", "--out", str(dataset), "--cases", str(args.cases), "--seed", str(args.seed)))
    load_at_start = os.getloadavg()[0]
    seconds: dict[int, list[float]] = {n: [] for n in args.workers}
    outputs: dict[int, Path] = {}
    for repeat in range(args.repeats):
        order = args.workers if repeat % 2 == 0 else list(reversed(args.workers))
        for workers in order:
            out = work / f"out-{workers}-workers-{repeat}"
            extra = ["--no-report"] if args.no_report else []
            seconds[workers].append(run(command("classify", "--dataset", str(dataset), "--out", str(out), "--workers", str(workers), *extra)))
            outputs[workers] = out
            print(f"{workers} worker(s), repeat {repeat}: {seconds[workers][-1]:.1f} s", file=sys.stderr)

    reference = outputs[args.workers[0]]
    identical = all((outputs[n] / "nodes.csv").read_bytes() == (reference / "nodes.csv").read_bytes()
                    and json.loads((outputs[n] / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
                    for n in args.workers)
    best = {n: min(values) for n, values in seconds.items()}
    base = best[args.workers[0]]
    results = {
        "cases": args.cases, "report": not args.no_report, "cpu_cores": os.cpu_count(),
        "load_average_1min_at_start": round(load_at_start, 2), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "seconds": {str(n): [round(v, 2) for v in values] for n, values in seconds.items()},
        "cases_per_minute": {str(n): round(60.0 * args.cases / best[n], 2) for n in args.workers},
        "speedup_vs_first": {str(n): round(base / best[n], 2) for n in args.workers},
        "outputs_identical": identical,
    }
    for n in args.workers:
        print(f"{n} worker(s): {best[n]:.1f} s, {60.0 * args.cases / best[n]:.1f} cases/min ({base / best[n]:.2f}x)")
    print(f"outputs identical: {identical}")
    print(json.dumps(results))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
