"""Benchmark of the campaign driver: trivial quanta through the batching driver and the ledger.

``run_campaign`` runs N trivial quanta (:func:`daskdiff.workflow.driver.trivial_quantum`: no
I/O, done at once) on a LocalCluster, through the same code path as a real campaign: the
registry-backed ledger (pending, running at submission, the final state at the end, batched
transactions), the bounded window of futures and the summary. A thread samples the driver
process's resident memory (which includes the LocalCluster's scheduler) while it runs::

    .venv/bin/python benchmarks/bench_driver.py [--quanta 100000] [--workers 2]
        [--window 4000] [--repeats 1] [--json out.json]

Reported: quanta per second (wall), the driver's CPU seconds, its peak RSS and the RSS at a
tenth, half and the end of the run (flat memory: the later samples do not grow with the
number of quanta processed). The target is at least 200 quanta per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


_CLUSTER = """
import sys
from distributed import LocalCluster
with LocalCluster(n_workers=int(sys.argv[1]), threads_per_worker=1, processes=True,
                  dashboard_address="127.0.0.1:0") as cluster:
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()  # until the benchmark closes it
"""


@contextlib.contextmanager
def scheduler_process(workers: int):
    """Start a LocalCluster in a child process; yield (address, scheduler process)."""
    child = subprocess.Popen([sys.executable, "-c", _CLUSTER, str(workers)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield child.stdout.readline().strip(), psutil.Process(child.pid)
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def _sampler(samples: list[tuple], counter: list[int], stop: threading.Event,
             interval: float, other: psutil.Process | None) -> None:
    process = psutil.Process()
    start = time.perf_counter()
    while not stop.is_set():
        samples.append((time.perf_counter() - start, process.memory_info().rss, counter[0],
                        other.memory_info().rss if other is not None else 0))
        stop.wait(interval)


def run_once(n_quanta: int, workers: int, window: int, n_detectors: int = 189, *,
             separate: bool = False) -> dict:
    """Run one campaign of ``n_quanta`` trivial quanta and return its figures.

    With ``separate``, the LocalCluster (scheduler and workers) runs in a child process and the
    driver connects to it by address (as to a Slurm cluster's scheduler), so that the driver's
    memory is its own; the scheduler process's memory is sampled too.
    """
    with contextlib.ExitStack() as stack:
        if separate:
            address, other = stack.enter_context(scheduler_process(workers))
        else:
            address, other = "local", None
        return _run_once(n_quanta, workers, window, n_detectors, address, other)


def _run_once(n_quanta: int, workers: int, window: int, n_detectors: int, cluster: str,
              other: psutil.Process | None) -> dict:
    from daskdiff import Repository, load_pipeline
    from daskdiff.workflow.campaign import run_campaign
    from daskdiff.workflow.driver import trivial_quantum

    with tempfile.TemporaryDirectory() as tmp:
        repo = Repository.create(Path(tmp) / "repo")
        quanta = [(1000 + i // n_detectors, i % n_detectors) for i in range(n_quanta)]
        counter = [0]
        samples: list[tuple] = []
        stop = threading.Event()

        def progress(message: str) -> None:
            if message.startswith("visit "):
                counter[0] += 1

        thread = threading.Thread(target=_sampler, args=(samples, counter, stop, 0.5, other),
                                  daemon=True)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        thread.start()
        summary = run_campaign(load_pipeline(WORKFLOWS / "al.yaml"), repo, run="bench",
                               quanta=quanta, cluster=cluster, workers=workers,
                               batch_size=window, quantum_function=trivial_quantum,
                               progress=progress)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        stop.set()
        thread.join()
        counts = repo.ledger.counts("bench")
    assert counts["done"] == n_quanta, counts
    driving = [s for s in samples if s[2] > 0]  # after the cluster started
    rss = [s[1] for s in driving] or [s[1] for s in samples]

    def at(fraction: float) -> int:
        return rss[min(len(rss) - 1, int(fraction * (len(rss) - 1)))]

    steady = next((s for s in samples if s[2] >= 0.05 * n_quanta), None)
    tail = samples[-1]
    steady_rate = ((tail[2] - steady[2]) / (tail[0] - steady[0])
                   if steady is not None and tail[0] > steady[0] else float("nan"))
    return {"quanta": n_quanta, "workers": workers, "window": window, "cluster": cluster,
            "steady_quanta_per_s": steady_rate,
            "wall_s": wall, "driver_cpu_s": cpu, "quanta_per_s": n_quanta / wall,
            "loop_quanta_per_s": n_quanta / summary.seconds,
            "rss_peak_mib": max(s[1] for s in samples) / 2**20,
            "rss_10pct_mib": at(0.1) / 2**20, "rss_50pct_mib": at(0.5) / 2**20,
            "rss_end_mib": at(1.0) / 2**20,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "scheduler_process_rss_end_mib": samples[-1][3] / 2**20,
            "scheduler_process_rss_peak_mib": max(s[3] for s in samples) / 2**20,
            "samples": [(round(t, 2), round(r / 2**20, 1), n, round(o / 2**20, 1))
                        for t, r, n, o in samples]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quanta", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--separate", action="store_true",
                        help="Run the cluster in a child process (the driver's own memory).")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    args = parser.parse_args()
    runs = [run_once(args.quanta, args.workers, args.window, separate=args.separate)
            for _ in range(args.repeats)]
    best = max(runs, key=lambda r: r["quanta_per_s"])
    for key, value in best.items():
        if key != "samples":
            print(f"{key:>18}: {value:.1f}" if isinstance(value, float) else
                  f"{key:>18}: {value}")
    verdict = 'met' if best['quanta_per_s'] >= 200 else 'NOT met'
    print(f"{'target':>18}: >= 200 quanta/s -> {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"best": best, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
