"""Scoring items beyond one process: ``--backend local --workers N`` and ``--backend ray``, one code path.

The driver (:class:`memeval.runner.Runner`) cuts every (method, task) pair's pending items into batches
(:class:`Job`) and hands them to a pool of workers. A :class:`Worker` holds the prepared protocol of each task it
has seen (model loaded, ground truth built, once per worker), scores a job with the runner's own
:class:`~memeval.scoring.PairRunner` (failure isolation, weight fingerprint check and restore included) and
returns the records; it never writes results. The driver alone appends them to ``results.jsonl``, skipping an
item already recorded, so a job retried after its worker died is never recorded twice.

- :class:`LocalPool`: worker processes on this machine (``spawn``), one per ``--device`` entry or ``--workers``,
  each with ``cores / workers`` torch threads on CPU. A process that dies (OOM, killed) breaks the pool; the
  jobs it had not returned are run again in a new pool (at most :data:`ATTEMPTS` times, then recorded as errors).
- :class:`RayPool`: one Ray actor per worker, with ``num_gpus=1`` on CUDA and ``num_cpus`` threads; Ray restarts
  a dead actor and retries its tasks (``max_restarts``, ``max_task_retries``). On a cluster, organisms the tasks
  use are built once by the driver and shipped through Ray's object store to workers whose cache lacks them.

Workers build their plugin registry from entry points and ``MEMEVAL_PLUGIN_MODULES``: a plugin registered only
inside the driver's process (a test fixture, a notebook) is not seen by them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from memeval.errors import UsageError

if TYPE_CHECKING:
    from memeval.runner import RunOptions
    from memeval.tasks import Task

ATTEMPTS = 3  # runs of a job whose worker died before it is recorded as failed
ENV_FOR_WORKERS = ("MEMEVAL_PLUGIN_MODULES", "MEMEVAL_LOAD_PLUGINS", "MEMEVAL_CACHE", "MEMEVAL_DATA", "PYTHONPATH",
                   "HF_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


@dataclass(frozen=True)
class Job:
    """One batch of one pair: the worker rebuilds the pair from the run options and checks the config hash."""

    task: str
    method: str
    config_hash: str
    items: tuple[str, ...]


class Worker:
    """Prepared protocols (one per task, built on first use) and the scoring of jobs."""

    def __init__(self, opts: "RunOptions", device: str, threads: int | None = None) -> None:
        import torch

        from memeval.runner import Runner

        if threads:
            torch.set_num_threads(threads)
        self.runner = Runner(dataclasses.replace(opts, device=device, progress=False, workers=1, backend="local"),
                             worker=True)
        self.tasks = {t.name: t for t in self.runner.tasks}
        self.prepared: dict[str, tuple] = {}
        self.pairs: dict[tuple[str, str], Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def _prepared(self, task_name: str) -> tuple:
        if task_name not in self.prepared:
            task = self.tasks[task_name]
            self.prepared[task_name] = self.runner._prepare(task)
            for pair in self.runner.pairs_for(task):
                self.pairs[(task_name, pair.method_cls.name)] = pair
        return self.prepared[task_name]

    def describe(self, task_name: str) -> dict[str, Any]:
        """What the driver needs to cut a task into jobs and summarize it (prepares the task here)."""
        protocol, _, directions, primary = self._prepared(task_name)
        return {"items": protocol.items(), "dev_items": protocol.dev_items(), "directions": directions,
                "primary": primary, "n_items": len(protocol.items())}

    def score(self, job: Job) -> list[dict[str, Any]]:
        """The records of one job (errors isolated per item), never written here."""
        from memeval.scoring import PairRunner

        protocol, model, _, _ = self._prepared(job.task)
        pair = self.pairs[(job.task, job.method)]
        if pair.config_hash != job.config_hash:
            raise UsageError(f"worker on {os.uname().nodename}: {job.method} on {job.task} has config hash "
                             f"{pair.config_hash}, the driver {job.config_hash}: memeval, the method or the task "
                             f"differ between machines")

        def restore() -> None:
            fresh = protocol.load_model(pair.task, self.runner.device, self.runner.dtype)
            model.hf.load_state_dict(fresh.hf.state_dict())

        method = pair.method_cls(pair.config)
        return PairRunner(protocol, model, None, restore).score_batch(method, pair, list(job.items), self.runner.opts.seed)


def _device_plan(opts: "RunOptions", devices: list[str]) -> tuple[list[str], int | None]:
    """The device of each worker and the torch threads each gets (CPU: the cores shared out)."""
    n = opts.workers or len(devices)
    plan = [devices[i % len(devices)] for i in range(n)]
    on_cpu = not any(d.startswith("cuda") or (d == "auto" and _cuda()) for d in plan)
    return plan, (max(1, (os.cpu_count() or 1) // n) if on_cpu else None)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def error_records(job: Job, message: str) -> list[dict[str, Any]]:
    return [{"method": job.method, "task": job.task, "item": item, "config_hash": job.config_hash, "seconds": 0.0,
             "batch_items": len(job.items), "error": message} for item in job.items]


# ---------------------------------------------------------------------------------------------
# Local processes

_WORKER: Worker | None = None


def _init_local(opts: "RunOptions", devices, threads: int | None) -> None:
    global _WORKER
    _WORKER = Worker(opts, devices.get(), threads)


def _describe(task_name: str) -> dict[str, Any]:
    return _WORKER.describe(task_name)


def _score(job: Job) -> list[dict[str, Any]]:
    return _WORKER.score(job)


def _prepare_then_wait(task_name: str, barrier) -> int:
    """Prepare a task, then hold this process until every worker has (so each takes exactly one call)."""
    _WORKER.describe(task_name)
    barrier.wait()
    return os.getpid()


class LocalPool:
    """Worker processes on this machine; a pool broken by a dead worker is replaced and its jobs rerun."""

    def __init__(self, opts: "RunOptions", devices: list[str]) -> None:
        import multiprocessing

        self.opts = opts
        self.plan, self.threads = _device_plan(opts, devices)
        self.ctx = multiprocessing.get_context("spawn")
        self.executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        queue = self.ctx.Queue()
        for device in self.plan:
            queue.put(device)
        return ProcessPoolExecutor(len(self.plan), mp_context=self.ctx, initializer=_init_local,
                                   initargs=(self.opts, queue, self.threads))

    def describe(self, task_name: str) -> dict[str, Any]:
        for attempt in range(ATTEMPTS):
            try:
                return self.executor.submit(_describe, task_name).result()
            except BrokenProcessPool:
                self._restart()
        raise UsageError(f"task '{task_name}': its worker process died {ATTEMPTS} times while preparing it")

    def prepare_everywhere(self, task_name: str) -> None:
        """Prepare a task in every worker process now rather than on its first job (benchmarks time jobs only)."""
        with self.ctx.Manager() as manager:
            barrier = manager.Barrier(len(self.plan))
            pids = [f.result() for f in [self.executor.submit(_prepare_then_wait, task_name, barrier)
                                         for _ in self.plan]]
        if len(set(pids)) != len(self.plan):
            raise RuntimeError(f"prepare_everywhere reached processes {sorted(set(pids))}, not {len(self.plan)}")

    def _restart(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._new_executor()

    def run(self, jobs: list[Job]) -> Iterator[list[dict[str, Any]]]:
        """Each job's records as it completes (any order)."""
        todo = {i: job for i, job in enumerate(jobs)}
        attempts = {i: 0 for i in todo}
        while todo:
            futures = {self.executor.submit(_score, job): i for i, job in todo.items()}
            broken = False
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    i = futures[f]
                    try:
                        records = f.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    del todo[i]
                    yield records
                if broken:
                    break
            if broken:
                self._restart()
                for i in list(todo):
                    attempts[i] += 1
                    if attempts[i] >= ATTEMPTS:
                        yield error_records(todo.pop(i), f"worker process died {ATTEMPTS} times scoring this batch")

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs Ray: pip install 'memeval[ray]'") from None
    return ray


def pack_dir(path: Path) -> bytes:
    """A directory as an in-memory tar (to ship a cache entry through Ray's object store)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=".")
    return buf.getvalue()


def install_organism(key: str, blob: bytes) -> Path:
    """Unpack a shipped organism into this machine's cache unless it is there (atomically, built once)."""
    from memeval.organisms import cache

    def build(tmp: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
            tar.extractall(tmp, filter="data")
        (tmp / cache.MARKER).unlink(missing_ok=True)

    return cache.build_atomically(key, build)


class RayWorker(Worker):
    """A :class:`Worker` as a Ray actor; shipped organisms are installed before anything is prepared."""

    def __init__(self, opts: "RunOptions", device: str, threads: int | None, organisms: dict[str, Any]) -> None:
        import ray

        for key, ref in organisms.items():
            install_organism(key, ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref)
        super().__init__(opts, device, threads)


class RayPool:
    """One Ray actor per worker, one job in flight per actor (the next goes to whichever actor finishes first,
    so uneven items balance; a round trip costs about 1.5 ms), results streamed as they finish."""

    def __init__(self, opts: "RunOptions", devices: list[str], tasks: list["Task"]) -> None:
        ray = _import_ray()
        self.ray = ray
        self.plan, threads = _device_plan(opts, devices)
        address = opts.ray_address or os.environ.get("RAY_ADDRESS") or None
        env = {k: os.environ[k] for k in ENV_FOR_WORKERS if k in os.environ}
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, num_cpus=None if address else max(len(self.plan), os.cpu_count() or 1),
                     include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
                     logging_level="ERROR")
        organisms = self._ship_organisms(tasks) if address else {}
        actor = ray.remote(RayWorker)
        self.actors = []
        for device in self.plan:
            gpus = 1 if device.startswith("cuda") or (device == "auto" and _cuda()) else 0
            self.actors.append(actor.options(num_cpus=threads or 1, num_gpus=gpus, max_restarts=ATTEMPTS,
                                             max_task_retries=ATTEMPTS)
                               .remote(opts, "cuda" if gpus and device == "auto" else device, threads, organisms))

    def _ship_organisms(self, tasks: list["Task"]) -> dict[str, Any]:
        """Organisms the tasks use, built here once and put in the object store for workers without them."""
        from memeval.organisms import get_organism, parse_organism_spec

        out = {}
        for spec in sorted({t.model for t in tasks if t.model.startswith("organism:")}):
            org = get_organism(*parse_organism_spec(spec.partition(":")[2]))
            out[org.path.name] = self.ray.put(pack_dir(org.path))
        return out

    def describe(self, task_name: str) -> dict[str, Any]:
        return self._get(self.actors[0].describe.remote(task_name))

    def prepare_everywhere(self, task_name: str) -> None:
        """Prepare a task in every actor now rather than on its first job (benchmarks time jobs only)."""
        self.ray.get([a.describe.remote(task_name) for a in self.actors])

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # an error raised by memeval inside the actor
            cause = e.as_instanceof_cause()
            if isinstance(cause, UsageError):
                raise UsageError(str(cause).splitlines()[0]) from None
            raise

    def run(self, jobs: list[Job]) -> Iterator[list[dict[str, Any]]]:
        queue = list(reversed(jobs))
        in_flight: dict[Any, tuple[int, Job]] = {}

        def submit(actor_index: int) -> None:
            if queue:
                job = queue.pop()
                in_flight[self.actors[actor_index].score.remote(job)] = (actor_index, job)

        for i in range(len(self.actors)):
            submit(i)
        while in_flight:
            (ref,), _ = self.ray.wait(list(in_flight), num_returns=1)
            actor_index, job = in_flight.pop(ref)
            try:
                records = self._get(ref)
            except self.ray.exceptions.RayActorError:  # the actor died more than max_restarts times
                records = error_records(job, f"Ray actor died {ATTEMPTS + 1} times scoring this batch")
            yield records
            submit(actor_index)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_pool(opts: "RunOptions", devices: list[str], tasks: list["Task"]):
    """The pool of the run's backend."""
    return RayPool(opts, devices, tasks) if opts.backend == "ray" else LocalPool(opts, devices)
