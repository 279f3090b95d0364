"""Run many independent tasks in this process or in worker processes, rows in completion order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

__all__ = ["run_tasks"]

#: The worker's state: set once per process by `_start` (the pool's initializer), read by `_call`.
_WORKER: dict[str, Any] = {}


def _start(
    setup: Callable[..., Any], work: Callable[[Any, Any], dict[str, Any]], args: tuple[Any, ...]
) -> None:
    _WORKER["context"] = setup(*args)
    _WORKER["work"] = work


def _call(task: Any) -> dict[str, Any]:
    return _WORKER["work"](_WORKER["context"], task)


def run_tasks(
    tasks: Sequence[Any],
    setup: Callable[..., Any],
    setup_args: tuple[Any, ...],
    work: Callable[[Any, Any], dict[str, Any]],
    jobs: int,
) -> Iterator[dict[str, Any]]:
    """`work(context, task)` for each task, where `context = setup(*setup_args)` is made once per
    process (the data set, loaded once). One job runs in this process; more start that many
    `spawn` workers (`setup` and `work` must be importable module-level functions)."""
    if jobs <= 1 or len(tasks) <= 1:
        context = setup(*setup_args)
        yield from (work(context, task) for task in tasks)
        return
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(
        jobs, initializer=_start, initargs=(setup, work, setup_args)
    )
    try:
        rows: Iterable[dict[str, Any]] = pool.imap_unordered(_call, tasks)
        yield from rows
    finally:
        pool.close()
        pool.join()
