"""Where `compile_blocks` runs independent blocks: in this process (``"local"``, the default)
or as Ray tasks (``"ray"``), on a cluster of this machine's cores started for the run, or on an
existing (multi-node) cluster named by ``address`` or ``FXCOMPRESS_RAY_ADDRESS`` (``ray start
--head`` on one machine, ``ray start --address=<head>:6379`` on the others; every node needs
fxcompress installed and the checkpoint and output folder at the same paths, e.g. a shared
file system). Ray is an optional extra (``pip install 'fxcompress[ray]'``).

A task is one block: it reads its weights from the checkpoint, compiles them on the stream
saved for it, writes its ``.pt2`` and returns its record, so what travels is paths and a few
numbers. Results are taken as tasks finish; the compile of each block is the same function with
the same inputs and thread count wherever it runs, so the plan and the bytes are the same as a
local run's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fxcompress.errors import FxCompressError

ENV_ADDRESS = "FXCOMPRESS_RAY_ADDRESS"
EXECUTORS = ("local", "ray")


class LocalExecutor:
    """Runs each task in this process, in order."""

    name = "local"
    workers = 1

    def map_unordered(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator[Any]:
        """`fn(*task)` for each task, as each finishes."""
        for task in tasks:
            yield fn(*task)

    def close(self) -> None:
        """Nothing to release."""


class RayExecutor:
    """Runs each task as a Ray task of one CPU."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None,
                 threads: int = 1) -> None:
        try:
            import ray
        except ImportError:
            raise FxCompressError("executor='ray' needs Ray, which is not installed; install "
                                  "it (pip install 'fxcompress[ray]') or use the default "
                                  "executor='local'") from None
        self.ray = ray
        address = address or os.environ.get(ENV_ADDRESS) or None
        self.started = not ray.is_initialized()
        if self.started:
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if address is None:
                kw["num_cpus"] = workers or os.cpu_count() or 1
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise FxCompressError(f"could not start or reach the Ray cluster "
                                      f"{address or '(local)'} ({type(e).__name__}: "
                                      f"{str(e).strip()[:200]}); check the address "
                                      f"(ray status on the head node) or unset {ENV_ADDRESS}"
                                      ) from None
        self.threads = threads
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)

    def map_unordered(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator[Any]:
        """`fn(*task)` for each task on the cluster, as each finishes."""
        ray = self.ray
        remote = ray.remote(num_cpus=self.threads, max_retries=0)(fn)
        pending = [remote.remote(*task) for task in tasks]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])

    def close(self) -> None:
        """Stop the cluster this executor started (one it joined keeps running)."""
        if self.started:
            self.ray.shutdown()


def make_executor(executor: str, address: str | None, threads: int) -> LocalExecutor | RayExecutor:
    """The executor named `executor` (see `EXECUTORS`)."""
    if executor == "local":
        if address:
            raise FxCompressError("a Ray address was given with executor='local'; pass "
                                  "executor='ray' to use the cluster, or drop the address")
        return LocalExecutor()
    if executor == "ray":
        return RayExecutor(address, threads=threads)
    raise FxCompressError(f"executor {executor!r} is unknown; use one of {', '.join(EXECUTORS)}")
