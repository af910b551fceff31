"""A round as a plan: the registry's stages (jobs/registry.py) with their tasks, and which are done.

Done-ness is known only where a stage's inputs are settled: a stage whose upstream stages have work to do
has nothing done (its inputs will change), and its own check is not even asked (before the ingest stage has
run, the decode shards cannot be checked). Each task checks again when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.registry import Stage, Task, applicable
from respect_hpc.config.schema import Manifest


@dataclass
class PlannedStage:
    """A stage of this round: its tasks, and the keys of those whose outputs are current."""

    stage: Stage
    tasks: list[Task]
    done: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def todo(self) -> list[Task]:
        return [t for t in self.tasks if t.key not in self.done]


def build(manifest: Manifest) -> list[PlannedStage]:
    """The round's stages with their tasks (nothing marked done)."""
    return [PlannedStage(s, s.tasks(manifest)) for s in applicable(manifest)]


def mark_done(manifest: Manifest, stages: list[PlannedStage]) -> list[PlannedStage]:
    """Mark each stage's done tasks, in order; a stage downstream of work to do has none."""
    with_work: set[str] = set()
    for planned in stages:
        settled = not (with_work & set(planned.stage.upstream))
        planned.done = planned.stage.done(manifest) if settled else set()
        if planned.todo:
            with_work.add(planned.name)
    return stages


def plan(manifest: Manifest) -> list[PlannedStage]:
    return mark_done(manifest, build(manifest))
