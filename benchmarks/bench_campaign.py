"""Benchmark of a whole campaign: detector-visits per minute with 1 and with 2 workers.

Simulates a preset (default ``demo``: 6 visits x 4 detectors of 2048^2) once, then runs the
AL pipeline (``workflows/al.yaml``) over all of it on a LocalCluster of N single-thread
workers, for each N, into a fresh run each time (``bench-wN-K``)::

    .venv/bin/python benchmarks/bench_campaign.py [--preset demo] [--workers 1 2]
        [--repeats 1] [--workdir DIR] [--json out.json]

Reported per worker count (the best of the repeats): the wall seconds of the campaign
(cluster start included, and without it: the driving loop alone), detector-visits per minute,
the CPU seconds of the driver and of the workers (``getrusage`` of the reaped children), the
largest per-quantum peak memory, and the speed-up of each N over the first.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(root: Path, workers: int, run: str) -> dict:
    """Run the AL campaign on ``root`` with ``workers`` local workers; return its figures."""
    from daskdiff import Repository, load_pipeline
    from daskdiff.workflow.campaign import run_campaign

    repo = Repository.open(root)
    first: list[float] = []

    def progress(message: str) -> None:
        if message.startswith("run ") and not first:
            first.append(time.perf_counter())  # the cluster is up

    cpu0, children0, wall0 = time.process_time(), _children_cpu(), time.perf_counter()
    summary = run_campaign(load_pipeline(WORKFLOWS / "al.yaml"), repo, run=run,
                           cluster="local", workers=workers, progress=progress)
    wall = time.perf_counter() - wall0
    loop = time.perf_counter() - (first[0] if first else wall0)
    n = summary.processed
    return {"workers": workers, "run": run, "quanta": n, "counts": summary.counts,
            "wall_s": wall, "loop_s": loop, "per_minute": 60 * n / wall,
            "per_minute_loop": 60 * n / loop, "driver_cpu_s": time.process_time() - cpu0,
            "workers_cpu_s": _children_cpu() - children0,
            "peak_quantum_memory_mib": (summary.peak_memory or 0) / 2**20,
            "dia_sources": summary.n_dia_sources}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", help="Simulation preset (demo, tiny, ...).")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Keep the repository here (reused if it exists).")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    args = parser.parse_args()

    from daskdiff.simulate.campaign import simulate
    from daskdiff.simulate.presets import get_preset

    with tempfile.TemporaryDirectory() as tmp:
        root = (args.workdir or Path(tmp)) / f"{args.preset}-repo"
        if not (root / "registry.sqlite3").exists():
            start = time.perf_counter()
            simulate(root, get_preset(args.preset, seed=args.seed))
            print(f"simulated {args.preset} in {time.perf_counter() - start:.0f} s")
        best: dict[int, dict] = {}
        runs = []
        for k in range(args.repeats):
            for workers in args.workers:
                figures = run_once(root, workers, f"bench-w{workers}-{k}-{time.time_ns()}")
                runs.append(figures)
                print(json.dumps({key: value for key, value in figures.items()
                                  if key != "counts"}, default=float))
                if workers not in best or figures["wall_s"] < best[workers]["wall_s"]:
                    best[workers] = figures
    base = best[args.workers[0]]
    print(f"preset {args.preset}: {base['quanta']} detector-visits, counts {base['counts']}")
    for workers, figures in best.items():
        print(f"{workers} worker(s): {figures['wall_s']:.0f} s wall "
              f"({figures['loop_s']:.0f} s without the cluster start), "
              f"{figures['per_minute']:.1f} detector-visits/min "
              f"({figures['per_minute_loop']:.1f} without the start), "
              f"driver CPU {figures['driver_cpu_s']:.0f} s, workers CPU "
              f"{figures['workers_cpu_s']:.0f} s, speed-up "
              f"{base['wall_s'] / figures['wall_s']:.2f} "
              f"({base['loop_s'] / figures['loop_s']:.2f} without the start)")
    if args.json:
        args.json.write_text(json.dumps({"best": best, "runs": runs}, indent=1, default=float))


if __name__ == "__main__":
    main()
