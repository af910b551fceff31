"""A round as a plan: stages in order, each an array of tasks, each task done or not.

    ingest -> decode (one task per shard) -> merge -> train (variant x cell x seed) -> select
    [-> deploy (one task per shard of simulated games) -> collect] -> metrics

The seed round (no logs) is train (the seed policy x cell x seed) -> select [-> deploy -> collect]; the
bracketed stages run where the manifest has a ``simulation`` section.

A task is done when its output records the hash of its current spec (see hashing.py).
Done-ness is known only where a stage's inputs exist: before ingest has run, the
decode shards cannot be checked, so they count as to do, and each task checks again
when it starts (a shard whose part is current and a training task whose done.json
matches return at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jobs.decode
import jobs.deploy
import jobs.ingest
import jobs.metrics
import jobs.select
import jobs.train
from respect_hpc.config.schema import Manifest

STAGES = ("ingest", "decode", "merge", "train", "select", "deploy", "collect", "metrics")
# What each stage reads the outputs of (directly or through another stage).
UPSTREAM = {"ingest": (), "decode": ("ingest",), "merge": ("ingest", "decode"),
            "train": ("ingest", "decode", "merge"), "select": ("ingest", "decode", "merge", "train"),
            "deploy": ("ingest", "decode", "merge", "train", "select"),
            "collect": ("ingest", "decode", "merge", "train", "select", "deploy"), "metrics": ("ingest",)}


@dataclass(frozen=True)
class Task:
    """One array task: ``call(*args)`` in a job; ``key`` names it in state and status."""

    key: str
    call: Callable
    args: tuple


@dataclass
class Stage:
    name: str
    tasks: list[Task]
    done: set[str] = field(default_factory=set)

    @property
    def todo(self) -> list[Task]:
        return [t for t in self.tasks if t.key not in self.done]


def shard_key(shard: int, n_shards: int) -> str:
    return f"shard-{shard:05d}-of-{n_shards:05d}"


def train_key(variant: str, cell: str, seed: int) -> str:
    return f"{variant}/seed-{seed}" if cell == "default" else f"{variant}@{cell}/seed-{seed}"


def build(manifest: Manifest, stages: tuple[str, ...] = STAGES) -> list[Stage]:
    """The round's stages with their tasks (nothing marked done)."""
    n = manifest.decoder.shards
    tasks = {
        "ingest": [Task("ingest", jobs.ingest.stage, (manifest,))],
        "decode": [Task(shard_key(s, n), jobs.decode.run_shard, (manifest, s, n)) for s in range(n)],
        "merge": [Task("merge", jobs.decode.merge, (manifest, n))],
        "train": [Task(train_key(v, c, s), jobs.train.TrainTask(manifest, v, s, c), ())
                  for v, c, s in jobs.select.tasks(manifest)],
        "select": [Task("select", jobs.select.run, (manifest,))],
        "metrics": [Task("metrics", jobs.metrics.stage, (manifest,))],
    }
    if manifest.simulation is not None:
        games = manifest.simulation.shards
        tasks["deploy"] = [Task(shard_key(s, games), jobs.deploy.run_shard, (manifest, s, games)) for s in range(games)]
        tasks["collect"] = [Task("collect", jobs.deploy.collect, (manifest, games))]
    else:
        stages = tuple(s for s in stages if s not in ("deploy", "collect"))
    if manifest.seed_round:  # no logs: nothing to ingest, decode or measure
        stages = tuple(s for s in stages if s in ("train", "select", "deploy", "collect"))
    return [Stage(name, tasks[name]) for name in stages]


def mark_done(manifest: Manifest, stages: list[Stage]) -> list[Stage]:
    """Mark the tasks whose outputs are current (hashes in metadata and markers, read once per call)."""
    n = manifest.decoder.shards
    ingested = jobs.ingest.is_done(manifest)
    plans = jobs.decode.plan(manifest, n) if ingested else None
    merged = ingested and jobs.decode.merge_done(manifest, n, plans)
    for stage in stages:
        _mark(manifest, stage, ingested, plans, merged)
    return stages


def _mark(manifest: Manifest, stage: Stage, ingested: bool, plans, merged: bool) -> None:
    n = manifest.decoder.shards
    if stage.name == "ingest":
        stage.done = {"ingest"} if ingested else set()
    elif stage.name == "decode":
        stage.done = {shard_key(s, n) for s in jobs.decode.done_shards(manifest, n, plans)} if ingested else set()
    elif stage.name == "merge":
        stage.done = {"merge"} if merged else set()
    elif stage.name == "train":
        stage.done = {train_key(v, c, s) for v, c, s in jobs.select.tasks(manifest)
                      if (merged or manifest.seed_round) and jobs.train.is_done(jobs.train.task_dir(manifest, v, s, c),
                                                       jobs.train.task_hash(manifest, v, s, c))}
    elif stage.name == "select":
        stage.done = {"select"} if jobs.select.is_done(manifest) else set()
    elif stage.name == "deploy":
        games = manifest.simulation.shards
        stage.done = {shard_key(s, games) for s in jobs.deploy.done_shards(manifest, games)}
    elif stage.name == "collect":
        stage.done = {"collect"} if jobs.deploy.is_collected(manifest, manifest.simulation.shards) else set()
    elif stage.name == "metrics":
        stage.done = {"metrics"} if ingested and jobs.metrics.is_done(manifest) else set()


def downstream_of_todo(stages: list[Stage]) -> list[Stage]:
    """Once a stage has work to do, the outputs of the stages that read it will change: nothing there is done."""
    with_work: set[str] = set()
    for stage in stages:
        if with_work & set(UPSTREAM[stage.name]):
            stage.done = set()
        if stage.todo:
            with_work.add(stage.name)
    return stages
