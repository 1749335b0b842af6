"""A pool of CPU processes joined by torch.distributed (gloo over loopback) for the tests.

`Ranks(world_size)` spawns the processes once; `ranks.run(fn, *args)` runs `fn(rank, world_size,
*args)` on every rank at once and returns the per-rank results, or raises with the failing ranks'
tracebacks; `pair()` gives a task the group of ranks 0 and 1, for two-rank runs. `fn` must be
importable (a module-level function). The rendezvous is a file store in a temporary directory, so
no port is chosen here (gloo binds its own free ports), and collectives time out after
COLLECTIVE_TIMEOUT instead of hanging a test run.
"""
from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# Spawning imports torch and dkm_kernels in every process: tens of seconds on a loaded machine.
START_TIMEOUT_S = 300
TASK_TIMEOUT_S = 300


def _serve(rank: int, world_size: int, store: str, tasks, results) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                             world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
        import dkm_kernels  # noqa: F401  (imported once, before the first task is timed)
        results.put((rank, True, "ready"))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))


_pairs = {}


def pair():
    """The process group of ranks 0 and 1 (every rank must call this, in the same tasks), and
    whether this rank belongs to it."""
    if "group" not in _pairs:
        _pairs["group"] = torch.distributed.new_group([0, 1])
    return _pairs["group"], torch.distributed.get_rank() < 2


class Ranks:
    def __init__(self, world_size: int):
        context = mp.get_context("spawn")
        self.world_size = world_size
        self._directory = tempfile.TemporaryDirectory()
        store = os.path.join(self._directory.name, "store")
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_serve, daemon=True,
                            args=(rank, world_size, store, self._tasks[rank], self._results))
            for rank in range(world_size)]
        for process in self._processes:
            process.start()
        self._collect(START_TIMEOUT_S)

    def _collect(self, timeout: float) -> list:
        results, failures = [None] * self.world_size, []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise RuntimeError(f"the ranks gave no result within {timeout} s") from None
            results[rank] = value
            if not ok:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            raise RuntimeError("\n".join(failures))
        return results

    def run(self, fn, *args, timeout: float = TASK_TIMEOUT_S) -> list:
        for tasks in self._tasks:
            tasks.put((fn, args))
        return self._collect(timeout)

    def close(self) -> None:
        for tasks, process in zip(self._tasks, self._processes):
            if process.is_alive():
                tasks.put(None)
        deadline = time.monotonic() + 1  # one second for all of them to exit, then killed
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        self._directory.cleanup()
