"""The stage registry: every stage of a round, what it reads, its tasks and when a task is done.

    ingest -> decode (one task per shard) -> merge -> train (variant x sweep cell x seed) -> select
        [-> deploy (one task per shard of simulated games) -> collect] -> metrics

Each stage module declares one :class:`Stage`; the plan and the controller loop over :func:`stages` and
never name a stage's functions. A task is done when its output records the hash of its current spec
(core/hashing.py); ``done`` is the one place a stage says which of its tasks are, and each task checks the
same again when it starts. A stage whose upstream has work to do has nothing done: its inputs will change.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from respect_hpc.config.schema import Manifest
from respect_hpc.core.errors import RespectError

# The order stages run in; a stage module of the same name declares each.
ORDER = ("ingest", "decode", "merge", "train", "select", "deploy", "collect", "metrics")


@dataclass(frozen=True)
class Task:
    """One array task: ``call(*args)`` in a job; ``key`` names it in job records and status."""

    key: str
    call: Callable
    args: tuple = ()


@dataclass(frozen=True)
class Stage:
    """A stage of a round: its name, the stages whose outputs it reads, its tasks and which are done."""

    name: str
    upstream: tuple[str, ...]
    tasks: Callable[[Manifest], list[Task]]
    done: Callable[[Manifest], set[str]]  # keys of the tasks whose outputs are current
    applies: Callable[[Manifest], bool] = lambda manifest: True  # whether the round has this stage
    progress: Callable[[Manifest, str], str] | None = None  # how far a running task is, by its key (status)


class TaskError(RespectError, ValueError):
    """A task asked for that the stage does not have (a shard out of range, say)."""


def shard_key(shard: int, n_shards: int) -> str:
    return f"shard-{shard:05d}-of-{n_shards:05d}"


def check_shard(shard: int, n_shards: int) -> None:
    if not 0 <= shard < n_shards:
        raise TaskError(f"--shard {shard}: expected 0 to {n_shards - 1}")


def stages() -> list[Stage]:
    """Every stage, in order (imported here: the stage modules import this one for its types)."""
    return [importlib.import_module(f"jobs.{name}").STAGE for name in ORDER]


def stage(name: str) -> Stage:
    return importlib.import_module(f"jobs.{name}").STAGE


def applicable(manifest: Manifest) -> list[Stage]:
    """The stages of this manifest's round, in order."""
    return [s for s in stages() if s.applies(manifest)]


def upstream_of(name: str) -> set[str]:
    """Every stage whose outputs ``name`` reads, directly or through another stage."""
    found, todo = set(), list(stage(name).upstream)
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo += stage(current).upstream
    return found
