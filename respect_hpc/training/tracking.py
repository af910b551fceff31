"""Experiment tracking through Accelerate's trackers (TensorBoard, W&B, MLflow, trackio), main process only.

A task's run is named from (experiment, round, variant, sweep cell, seed, spec hash), so a requeued or rerun
task logs to the same run; its record (``tracking.json`` in the task folder) keeps the backend's own run id
where the backend makes one (MLflow). Values are held back and sent when a checkpoint commits them
(:meth:`Tracking.flush`): a task resumed from its checkpoint logs each step once, never twice, whatever
killed it. Offline by default: TensorBoard and MLflow write under the run directory, W&B in offline mode,
trackio locally.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from respect_hpc.config.schema import TrackingSection
from respect_hpc.core.errors import RespectError
from respect_hpc.core.io import atomic_write_text

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class TrackingError(RespectError, RuntimeError):
    """A tracking backend that cannot be used here."""


@dataclass(frozen=True)
class TrackedRun:
    """Where one task (or stage) logs: the section, its run's name, the run directory's tracking folder and
    the record kept beside the task's outputs."""

    section: TrackingSection
    project: str
    name: str
    folder: Path
    record: Path


def run_name(*parts: object) -> str:
    """A run name every backend accepts: the parts joined by '-', other characters as '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(str(p) for p in parts))


def check_backend(section: TrackingSection) -> None:
    """Refuses a backend whose package is not installed, with one line saying what to install."""
    package = PACKAGES.get(section.backend)
    if package and importlib.util.find_spec(package) is None:
        raise TrackingError(f"tracking.backend {section.backend}: the {package} package is not installed here "
                            f"(pip install {package}), or choose another backend")


def _tracker(run: TrackedRun, backend_id: str | None):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    section, folder = run.section, run.folder
    if section.backend == "tensorboard":
        return TensorBoardTracker(run.name, folder / "tensorboard" / run.project)
    if section.backend == "wandb":
        return WandBTracker(run.project, id=run.name, name=run.name, resume="allow", dir=str(folder),
                            mode="online" if section.online else "offline")
    if section.backend == "mlflow":
        if not section.online:
            import mlflow

            mlflow.set_tracking_uri(f"file:{folder / 'mlflow'}")
        return MLflowTracker(run.project, logging_dir=None if section.online else f"file:{folder / 'mlflow'}",
                             run_id=backend_id, run_name=run.name)
    return TrackioTracker(run.project, name=run.name, resume="allow")


@dataclass
class Tracking:
    """One run's tracker (None when tracking is off or this is not the main process) and the values held
    back until the next checkpoint."""

    run: TrackedRun | None
    tracker: object = None
    pending: list[tuple[int, dict]] = field(default_factory=list)

    @classmethod
    def start(cls, run: TrackedRun | None, config: dict, main_process: bool = True) -> Tracking:
        if run is None or run.section.backend == "none" or not main_process:
            return cls(None)
        check_backend(run.section)
        recorded = json.loads(run.record.read_text()) if run.record.is_file() else {}
        tracker = _tracker(run, recorded.get("backend_id"))
        tracker.start()
        backend_id = tracker.active_run.info.run_id if run.section.backend == "mlflow" else None
        if not recorded:
            tracker.store_init_configuration(config)
        run.record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"backend": run.section.backend, "project": run.project, "run": run.name,
                                      "backend_id": backend_id}), run.record)
        return cls(run, tracker)

    def log(self, step: int, values: dict) -> None:
        """Hold ``values`` of ``step`` until :meth:`flush`."""
        if self.tracker is not None:
            self.pending.append((step, values))

    def flush(self) -> None:
        """Send what a checkpoint has just committed."""
        for step, values in self.pending:
            self.tracker.log(values, step=step)
        self.pending.clear()

    def close(self) -> None:
        """End the run here; values no checkpoint committed are dropped (a resumed task logs them)."""
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
