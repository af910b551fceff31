"""The run directory: every path and file name of an experiment's outputs, in one place.

    <workdir>/<experiment>/
      manifest.lock.json                   the resolved manifest of the latest submission
      controller.lock                      who is submitting now
      cache/fingerprints.json              model digests, memoised
      logs/<stage>/<job id>/               submitit's logs and job pickles
      data/{interactions,turns,quarantine}.parquet
      feedback/<decoder key>/labels.parquet, round-R/part-SSSSS-of-NNNNN.parquet
      learning_curve.parquet               `loop`: every round's simulated deployment
      round-R/
        jobs.json                          every submission of the round
        feedback.parquet                   the round's decoded labels per turn
        train/<variant>[@<cell>]/seed-S/   one training task (:class:`TaskDir`)
        vision-cache/<model>/              the frozen vision model's outputs
        selection.parquet, policies/<variant>/
        deploy/part-SSSSS-of-NNNNN.parquet, deployed.parquet, deployed_truth.parquet
        metrics/round_metrics.parquet
        turn_eval.parquet                  turn evaluations, where a user adds them

A run directory is private to its owner (mode 0700): submitit keeps each job's pickled function under
``logs/``, and whoever can write there runs code as the user.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from respect_hpc.core.errors import RespectError

DEFAULT_CELL = "default"  # the one cell of a round without a sweep


class RunDirError(RespectError, PermissionError):
    """A run directory that cannot be made, or is not private to its user."""


def part_name(shard: int, n_shards: int) -> str:
    """The file of one shard's part of a table: ``part-00003-of-00008.parquet``."""
    return f"part-{shard:05d}-of-{n_shards:05d}.parquet"


@dataclass(frozen=True)
class DataDir:
    """The normalised logs: one row per game, one per logged action, and the refused rows."""

    root: Path

    @property
    def interactions(self) -> Path:
        return self.root / "interactions.parquet"

    @property
    def turns(self) -> Path:
        """Written last: the ingest's marker."""
        return self.root / "turns.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.parquet"


@dataclass(frozen=True)
class TaskDir:
    """One training task's folder: checkpoints, epoch adapters, metrics and its done marker."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "ckpt"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    @property
    def epochs(self) -> Path:
        return self.root / "epochs"

    def epoch(self, epoch: int) -> Path:
        """The adapter of a finished epoch (1-based)."""
        return self.epochs / f"epoch-{epoch:03d}"

    @property
    def metrics(self) -> Path:
        """Loss, learning rate and validation exact match by step and epoch."""
        return self.root / "metrics.parquet"

    @property
    def sources(self) -> Path:
        """Examples per (source, policy, round) of a finished task."""
        return self.root / "sources.parquet"

    @property
    def done(self) -> Path:
        """Written when the task finished, with the hash of its spec."""
        return self.root / "done.json"

    @property
    def tracking(self) -> Path:
        """The tracker run this task logs to (its backend's own id where it makes one), for a resumed task."""
        return self.root / "tracking.json"

    @property
    def mismatch_reference(self) -> Path:
        """KTO: log pi_ref(a'|x) of each logged example's mismatched click."""
        return self.root / "mismatch_reference.parquet"


@dataclass(frozen=True)
class FeedbackDir:
    """The labels one decoder (model, prompt template) gave, across rounds."""

    root: Path

    @property
    def labels(self) -> Path:
        """Every label so far: the cache a later round reuses."""
        return self.root / "labels.parquet"

    def parts(self, round_: int) -> Path:
        return self.root / f"round-{round_}"

    def part(self, round_: int, shard: int, n_shards: int) -> Path:
        return self.parts(round_) / part_name(shard, n_shards)


@dataclass(frozen=True)
class TrainedTask:
    """A training task found in a run directory, with what its folder names say."""

    round: int
    variant: str
    cell: str
    seed: int
    folder: TaskDir


_TASK = re.compile(r"round-(\d+)/train/([^/@]+)(?:@([^/]+))?/seed-(\d+)$")


@dataclass(frozen=True)
class RunDir:
    root: Path

    def make_private(self) -> Path:
        """Create the run directory (0700), or take group and other access away from an existing one (and from
        its logs/); refuse one (or a logs/ in it) that another user owns."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"{self.root}: cannot create the run directory ({exc.strerror}): choose a workdir "
                              "you can write to") from None
        for folder in (self.root, self.root / "logs"):
            if not folder.exists():
                continue
            stat = folder.stat()
            if stat.st_uid != os.getuid():
                raise RunDirError(f"{folder}: owned by another user (uid {stat.st_uid}); a run directory must be "
                                  "yours alone, as submitit's job pickles in it run as you: choose another workdir "
                                  "or experiment name")
            if stat.st_mode & 0o077:
                try:
                    folder.chmod(0o700)
                except OSError as exc:
                    raise RunDirError(f"{folder}: cannot make it private ({exc.strerror})") from None
        return self.root

    # -- the run as a whole ---------------------------------------------------------------------------
    @property
    def manifest_lock(self) -> Path:
        return self.root / "manifest.lock.json"

    @property
    def controller_lock(self) -> Path:
        return self.root / "controller.lock"

    @property
    def fingerprint_memo(self) -> Path | None:
        """Where model digests are memoised; None before the run directory exists (planning makes nothing)."""
        return self.root / "cache" / "fingerprints.json" if self.root.is_dir() else None

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage

    @property
    def data(self) -> DataDir:
        return DataDir(self.root / "data")

    def feedback(self, decoder_key: str) -> FeedbackDir:
        return FeedbackDir(self.root / "feedback" / decoder_key)

    @property
    def tracking(self) -> Path:
        """Experiment trackers' files (TensorBoard events, an offline W&B or MLflow store)."""
        return self.root / "tracking"

    @property
    def learning_curve(self) -> Path:
        return self.root / "learning_curve.parquet"

    # -- one round ------------------------------------------------------------------------------------
    def round(self, round_: int) -> Path:
        return self.root / f"round-{round_}"

    def rounds(self) -> list[int]:
        """The rounds this run directory holds, in order."""
        return sorted(int(p.name.split("-", 1)[1]) for p in self.root.glob("round-*")
                      if p.is_dir() and p.name.split("-", 1)[1].isdigit())

    def timings(self, round_: int) -> Path:
        """Each submitted task's wall time per attempt, a folder per stage (cluster/timing.py)."""
        return self.round(round_) / "timings"

    def jobs_record(self, round_: int) -> Path:
        return self.round(round_) / "jobs.json"

    def round_feedback(self, round_: int) -> Path:
        return self.round(round_) / "feedback.parquet"

    def task(self, round_: int, variant: str, cell: str, seed: int) -> TaskDir:
        """round-R/train/<variant>/seed-<s>, or round-R/train/<variant>@<cell>/seed-<s> in a sweep."""
        name = variant if cell == DEFAULT_CELL else f"{variant}@{cell}"
        return TaskDir(self.round(round_) / "train" / name / f"seed-{seed}")

    def trained_tasks(self) -> list[TrainedTask]:
        """Every training task folder of every round, read back from its path."""
        found = []
        for folder in sorted(self.root.glob("round-*/train/*/seed-*")):
            match = _TASK.search(folder.relative_to(self.root).as_posix())
            if match and folder.is_dir():
                round_, variant, cell, seed = match.groups()
                found.append(TrainedTask(int(round_), variant, cell or DEFAULT_CELL, int(seed), TaskDir(folder)))
        return found

    def vision_cache(self, round_: int, model: str) -> Path:
        return self.round(round_) / "vision-cache" / model

    def selection(self, round_: int) -> Path:
        return self.round(round_) / "selection.parquet"

    def policy(self, round_: int, variant: str) -> Path:
        """The adapter a round selected for a variant (what the next round deploys or continues from)."""
        return self.round(round_) / "policies" / variant

    def deploy_part(self, round_: int, shard: int, n_shards: int) -> Path:
        return self.round(round_) / "deploy" / part_name(shard, n_shards)

    def deployed(self, round_: int) -> Path:
        """A simulated deployment's games, in the public interaction layout."""
        return self.round(round_) / "deployed.parquet"

    def deployed_truth(self, round_: int) -> Path:
        """The simulator's truth of every deployed turn."""
        return self.round(round_) / "deployed_truth.parquet"

    def round_metrics(self, round_: int) -> Path:
        return self.round(round_) / "metrics" / "round_metrics.parquet"

    def turn_eval(self, round_: int) -> Path:
        return self.round(round_) / "turn_eval.parquet"
