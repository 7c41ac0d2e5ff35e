"""Scale-out over Ray: questions shared among N workers, each a Ray actor with its own model.

Each actor takes one GPU when the run is on CUDA, else ``threads`` CPU slots. The driver hands
out one question at a time to whichever actor is free (so a slow question does not hold up a
whole shard), and writes each actor's answers to that actor's own shard file
(``answers/run-<r>/shards/<method>.worker-<i>.jsonl``); the caller merges the shards,
de-duplicated by question_id. The driver writes the files, not the actors, so the workers need
no shared file system with it: on a cluster they only need specdecode and the model.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidArgument, SpecDecodeError
from .answers import append_answer, shard_path
from .questions import Question
from .worker import BenchConfig, BenchWorker

Item = tuple[int, Question, list[str]]  # (run, question, methods still to answer it)


def import_ray():
    try:
        import ray
    except ImportError:
        raise InvalidArgument(
            "workers", "--workers > 1 needs Ray: pip install 'specdecode[ray]' (the optional extra 'ray')"
        ) from None
    return ray


def _unwrap(error: Exception) -> Exception:
    """A Ray task error whose cause is one of ours -> that error, so the CLI prints it plainly."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, SpecDecodeError) else error


class _Actor:
    """The Ray actor around a BenchWorker. An error while loading is kept and raised by each
    call, so that it reaches the driver as our own error (a failed actor constructor would
    only say that the actor died)."""

    def __init__(self, config: BenchConfig):
        self.worker, self.error = None, None
        try:
            self.worker = BenchWorker(config)
        except SpecDecodeError as e:
            self.error = e

    def call(self, name: str, *args):
        if self.error is not None:
            raise self.error
        return getattr(self.worker, name)(*args)


def run_sharded(
    config: BenchConfig,
    items: list[Item],
    out: Path,
    *,
    workers: int,
    ray_address: str | None = None,
    warm_up_with: list[Question],
    on_ready: Callable[[], None] = lambda: None,
    on_answer: Callable[[dict], None] = lambda record: None,
) -> dict:
    """Answer ``items`` on ``workers`` Ray actors. Returns the first worker's ``info()``.

    ``on_ready`` is called once every actor has loaded its models and warmed up; ``on_answer``
    with each answer as it arrives.

    Ctrl-C (KeyboardInterrupt) propagates after the actors are stopped; whatever they had
    answered is already in the shard files.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    threads = config.threads or 1
    if started:
        env = {k: os.environ[k] for k in ("SPECDECODE_MODELS", "HF_HOME") if k in os.environ}
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": env})
        if ray_address:
            ray.init(address=ray_address, **kwargs)
        else:  # a local cluster with room for every worker, even if that oversubscribes the cores
            ray.init(num_cpus=max(os.cpu_count() or 1, workers * threads), **kwargs)
    actors = []
    try:
        on_gpu = config.device.startswith("cuda")
        if on_gpu:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if gpus < workers:
                raise InvalidArgument("workers", f"{workers} workers on CUDA need {workers} GPUs; the Ray cluster has {gpus}")
            # Ray shows each actor only its own GPU, as cuda:0.
            config = BenchConfig(**{**config.__dict__, "device": "cuda"})
            options = dict(num_gpus=1, num_cpus=threads)
        else:
            config = BenchConfig(**{**config.__dict__, "threads": threads})
            options = dict(num_cpus=threads)
        remote = ray.remote(_Actor)
        actors = [remote.options(**options).remote(config) for _ in range(workers)]
        try:
            ray.get([a.call.remote("warm_up", warm_up_with) for a in actors])
            info = ray.get(actors[0].call.remote("info"))
            on_ready()
            queue: deque[Item] = deque(items)
            in_flight: dict = {}

            def give(worker: int) -> None:
                if queue:
                    run, question, methods = queue.popleft()
                    ref = actors[worker].call.remote("answer_all", question, methods)
                    in_flight[ref] = (worker, run)

            for w in range(workers):
                give(w)
            while in_flight:
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                worker, run = in_flight.pop(ref)
                for record in ray.get(ref):
                    if record.get("skipped"):  # too long for the model: no answer to write
                        on_answer(record)
                        continue
                    append_answer(shard_path(out, run, record["method"], worker), record)
                    on_answer(record)
                give(worker)
        except ray.exceptions.RayError as e:
            raise _unwrap(e) from None
        return info
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
