"""Item throughput of the worker backends against one worker, same machine, same items, one process tree.

    python benchmarks/workers.py                                  # zero_out on del_organism, 12 items
    python benchmarks/workers.py --method random --items 24

For each configuration the pool is created and every worker prepares the task (organism cached, DEL's
measurements before ablation) before the clock starts; then the items are scored in batches of one (so that
two workers can share them out) and timed from the first job to the last record, the fastest of --repeats
passes (on this 2-core VM two passes differed by up to 14 %). Per-item metrics are compared
with the single-worker run. Scheduling overhead: the round trip of a call that does nothing, per backend.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memeval.runner import RunOptions, Runner  # noqa: E402
from memeval.workers import Job, LocalPool, RayPool  # noqa: E402


def measure(name: str, pool, runner: Runner, task, n_items: int, repeats: int) -> tuple[float, dict]:
    (pair,) = runner.pairs_for(task)
    info = pool.describe(task.name)
    items = info["items"][:n_items]
    pool.prepare_everywhere(task.name)
    warm = [Job(task.name, pair.method_cls.name, pair.config_hash, (i,)) for i in items[: len(pool.plan)]]
    list(pool.run(warm))  # and runs once (first-call costs) before timing
    jobs = [Job(task.name, pair.method_cls.name, pair.config_hash, (i,)) for i in items]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = {r["item"]: r["metrics"] for records in pool.run(jobs) for r in records}
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    print(f"{name:<34} {seconds:7.2f} s  {len(items) / seconds:6.2f} items/s  (best of "
          f"{' '.join(f'{t:.2f}' for t in times)} s)", flush=True)
    return len(items) / seconds, results


def overhead_local(pool: LocalPool, calls: int = 200) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        pool.executor.submit(os.getpid).result()
    return (time.perf_counter() - t0) / calls


def overhead_ray(pool: RayPool, calls: int = 200) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        pool.ray.get(pool.actors[0].pid.remote())
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="zero_out")
    ap.add_argument("--task", default="del_organism")
    ap.add_argument("--items", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes over the items; the fastest counts")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average before: {os.getloadavg()}")
    print(f"{args.method} on {args.task}, {args.items} items, batches of one item")
    base = RunOptions(methods=args.method, tasks=args.task, device="cpu", batch_size=1, progress=False)
    runner = Runner(base, worker=True)
    (task,) = runner.tasks
    configs = [("one worker (2 threads)", LocalPool, dict(workers=1)),
               ("local, 2 workers (1 thread each)", LocalPool, dict(workers=2)),
               ("ray, 2 actors (1 thread each)", RayPool, dict(workers=2, backend="ray")),
               ("one worker (1 thread)", LocalPool, dict(workers=1, device="cpu"))]
    rates, reference, overheads = {}, None, {}
    for name, cls, kw in configs:
        opts = RunOptions(**{**base.__dict__, **kw})
        pool = cls(opts, ["cpu"]) if cls is LocalPool else cls(opts, ["cpu"], [task])
        if name == "one worker (1 thread)":
            pool.close()
            pool = LocalPool(opts, ["cpu"])
            pool.threads = 1
            pool.executor.shutdown()
            pool.executor = pool._new_executor()
        with pool:
            rate, results = measure(name, pool, runner, task, args.items, args.repeats)
            if cls is LocalPool and name.startswith("local"):
                overheads["local"] = overhead_local(pool)
            if cls is RayPool:
                overheads["ray"] = overhead_ray(pool)
        rates[name] = rate
        if reference is None:
            reference = results
        else:
            same = results == reference
            diff = max((abs(results[i][m] - reference[i][m]) for i in reference for m in reference[i]
                        if reference[i][m] is not None), default=0.0)
            print(f"{'':<34} per-item metrics equal to one worker: {same} (max |diff| {diff:.2e})")
    one = rates["one worker (2 threads)"]
    for name, rate in rates.items():
        print(f"{name:<34} {rate / one:5.2f}x one worker (2 threads), "
              f"{rate / rates['one worker (1 thread)']:5.2f}x one worker (1 thread)")
    for backend, seconds in overheads.items():
        print(f"scheduling overhead, {backend}: {1e3 * seconds:.2f} ms per call (round trip of a no-op)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
