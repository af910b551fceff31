"""The round controller: plan a round, submit its stages as submitit arrays, wait or detach, report.

On Slurm every stage with work is submitted at once, as one array (split where the
cluster's MaxArraySize requires), each depending with ``afterok`` on the arrays of the
stages before it; the user may log out (``detach``). The local and debug executors
have no dependencies, so there the controller runs the stages one after the other,
checking before each which of its tasks are done. Either way done tasks are never
submitted, and a task that fails stops the stages after it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import submitit

from jobs.registry import ORDER, upstream_of
from respect_hpc.cluster import executors
from respect_hpc.cluster.plan import PlannedStage, build, mark_done
from respect_hpc.cluster.plan import plan as round_plan
from respect_hpc.cluster.scheduler import (
    ACTIVE,
    FAILED,
    SchedulerState,
    last_error_line,
    latest_tasks,
    local_state,
    log_path,
    record,
    slurm_states,
)
from respect_hpc.cluster.timing import timed
from respect_hpc.config.schema import Manifest
from respect_hpc.core.costs import record_path
from respect_hpc.core.errors import RespectError
from respect_hpc.core.io import atomic_write_text

DEFAULT_MAX_ARRAY_SIZE = 1001


class ControllerError(RespectError, RuntimeError):
    """A round that cannot be submitted (still running, failed tasks without --retry) or that failed."""


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices run from 0 to this minus one."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def array_chunks(tasks: list, max_size: int) -> list[list]:
    """Tasks cut into arrays of at most ``max_size`` (one sbatch call each)."""
    return [tasks[i:i + max_size] for i in range(0, len(tasks), max_size)]


@dataclass
class TaskStatus:
    stage: str
    key: str
    state: str        # done, pending, running, failed, cancelled, completed, not submitted
    detail: str = ""  # a failed task's last error line, a cancelled task's reason
    log: str = ""

    @property
    def active(self) -> bool:
        """Queued or running in the scheduler."""
        return self.state.upper() in ACTIVE


def with_upstream_failures(rows: list[TaskStatus]) -> list[TaskStatus]:
    """A task cancelled without a reason from the scheduler (sacct may not keep one) whose upstream stage has a
    failed task was cancelled by its dependency: say so, naming the failure."""
    failed: dict[str, TaskStatus] = {}
    for r in sorted(rows, key=lambda r: r.key):  # the first failed task of each stage, whatever the row order
        if r.state == "failed":
            failed.setdefault(r.stage, r)
    for i, row in enumerate(rows):
        cause = next((failed[s] for s in sorted(upstream_of(row.stage)) if s in failed), None)
        if row.state == "cancelled" and row.detail == "cancelled" and cause is not None:
            rows[i] = TaskStatus(row.stage, row.key, "cancelled", f"an upstream task failed ({cause.stage} "
                                 f"{cause.key}): its dependency was never satisfied", row.log)
    return rows


SIGNALLED = ("Caught signal", "KeyboardInterrupt", "stopped by SIG", "Terminated")


def _interrupted(log: Path) -> bool:
    """Whether a local task's log ends with the marks of a signal (its controller or a user stopped it)."""
    if not log.is_file():
        return False
    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
    return any(mark in line for line in tail for mark in SIGNALLED)


def task_status(stage: str, key: str, rec: dict, scheduler: SchedulerState) -> TaskStatus:
    """A submitted task whose output is not current, from its job record (job id, log folder) and the
    scheduler's state: out of date (it ended well, yet its output is missing or stale), failed (with its last
    error line), cancelled (with the scheduler's reason), pending or running."""
    log = str(log_path(rec["folder"], rec["job_id"]))
    state = scheduler.state
    error = last_error_line(Path(log), errors_only=True)
    if state == "ENDED" and _interrupted(Path(log)):
        return TaskStatus(stage, key, "interrupted", "stopped by a signal before it finished; a run resumes it", log)
    if state == "COMPLETED" or (state == "ENDED" and not error):
        return TaskStatus(stage, key, "out of date", "its output is missing, damaged or stale: a run redoes it", log)
    if state in FAILED or state == "ENDED":
        return TaskStatus(stage, key, "failed", error or last_error_line(Path(log)), log)
    if state.startswith("CANCELLED"):
        reason = scheduler.reason if scheduler.reason not in ("", "None") else "cancelled"
        return TaskStatus(stage, key, "cancelled", reason, log)
    if state in ACTIVE:
        return TaskStatus(stage, key, state.lower(), scheduler.reason if state == "PENDING" else "", log)
    return TaskStatus(stage, key, state.lower(), "", log)


def _stop_local(jobs: list[submitit.Job], grace_s: float = 10.0) -> None:
    """Stop local jobs with their controller: SIGTERM to each job's launcher (a local job's id is its process),
    which passes it on (a training task saves a checkpoint and exits); submitit's cancel for any still running
    after `grace_s`. Returns once they have ended, so that their last words come before the controller's."""
    def wait(deadline: float) -> list[submitit.Job]:
        running = [job for job in jobs if not job.done()]
        while running and time.monotonic() < deadline:
            time.sleep(0.2)
            running = [job for job in running if not job.done()]
        return running

    for job in jobs:
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(job.job_id), signal.SIGTERM)
    for job in wait(time.monotonic() + grace_s):
        job.cancel(check=False)
    wait(time.monotonic() + 5.0)


@contextmanager
def _terminate_as_exit():
    """SIGTERM raises SystemExit in the controller (its default would end it at once), so that its local jobs
    are stopped with it; only in the main thread, where handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_manifest_lock(path: Path) -> dict | None:
    """What manifest.lock.json records (source, its KEY=VALUE overrides, round, manifest), or None where there is none or it is damaged."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("manifest"), dict) else None


def dependencies(stage: str, arrays: dict[str, list[str]]) -> list[str]:
    """The arrays a stage's array waits for (afterok): those submitted for the stages it reads, directly or
    through another stage."""
    return [job_id for name in sorted(upstream_of(stage)) for job_id in arrays.get(name, [])]


class Controller:
    """Plans, submits and follows one round; ``source``: the manifest file it was read from, recorded in the run
    directory so that another manifest of the same experiment and round cannot overwrite its tables."""

    def __init__(self, manifest: Manifest, executor: str | None = None, report=print, source: Path | None = None,
                 overrides: list[str] | None = None):
        self.manifest, self.report, self.overrides = manifest, report, list(overrides or ())
        self.kind = executor or manifest.cluster.executor
        self.run_dir = manifest.run_dir
        self.source = source.resolve() if source is not None else None

    # -- planning -----------------------------------------------------------------------------------
    def plan(self) -> list[PlannedStage]:
        """Every stage with its done tasks marked; work in a stage makes the later stages' work to do."""
        return round_plan(self.manifest)

    def status(self, stages: list[PlannedStage] | None = None) -> list[TaskStatus]:
        recorded = latest_tasks(self.run_dir.jobs_record(self.manifest.round))
        slurm = slurm_states([r["job_id"] for r in recorded.values() if r["executor"] == "slurm"])
        rows = []
        for stage in stages or self.plan():
            for task in stage.tasks:
                rec = recorded.get((stage.name, task.key))
                if task.key in stage.done:
                    rows.append(TaskStatus(stage.name, task.key, "done",
                                           log=str(log_path(rec["folder"], rec["job_id"])) if rec else ""))
                    continue
                if rec is None:
                    rows.append(TaskStatus(stage.name, task.key, "not submitted"))
                    continue
                scheduler = (slurm.get(rec["job_id"], SchedulerState("UNKNOWN")) if rec["executor"] == "slurm"
                             else local_state(rec["job_id"]))
                row = task_status(stage.name, task.key, rec, scheduler)
                if row.state == "running" and stage.stage.progress is not None:
                    row = replace(row, detail=stage.stage.progress(self.manifest, task.key))
                rows.append(row)
        return with_upstream_failures(rows)

    # -- submitting ---------------------------------------------------------------------------------
    def check_previous(self, retry: bool, stages: list[PlannedStage]) -> None:
        """Refuse while tasks of this round are still queued or running, and after failures without --retry."""
        rows = [r for r in self.status(stages) if r.state not in ("done", "not submitted", "out of date", "interrupted")]
        active = [r for r in rows if r.active]
        if active:
            raise ControllerError(f"round {self.manifest.round} is still running: {len(active)} tasks pending or "
                                  f"running (e.g. {active[0].stage} {active[0].key}); see respect-hpc status "
                                  f"{self.run_dir.root}")
        failed = [r for r in rows if r.state in ("failed", "cancelled")]
        if failed and not retry:
            first = next((r for r in failed if r.state == "failed"), failed[0])
            raise ControllerError(f"{len(failed)} tasks of round {self.manifest.round} failed or were cancelled "
                                  f"(e.g. {first.stage} {first.key}: {first.detail or first.state}); fix the cause, "
                                  "then run again with --retry to resubmit only those")

    def submit(self, stage: PlannedStage, after: list[str]) -> dict[str, submitit.Job]:
        """One array per chunk of the stage's tasks to do; records the job ids."""
        ex = executors.executor(self.manifest, stage.name, self.kind)
        if self.kind == "slurm" and after:
            ex.update_parameters(dependency="afterok:" + ":".join(after))
        chunks = array_chunks(stage.todo, max_array_size() if self.kind == "slurm" else len(stage.todo) or 1)
        jobs: dict[str, submitit.Job] = {}
        resources = self.manifest.cluster.stages[stage.name]
        folder = self.run_dir.timings(self.manifest.round) / stage.name
        for chunk in chunks:
            with ex.batch():
                submitted = [ex.submit(timed(task.call, record_path(folder, task.key), resources.gpus * resources.nodes),
                                       *task.args) for task in chunk]
            jobs.update({task.key: job for task, job in zip(chunk, submitted)})
        record(self.run_dir.jobs_record(self.manifest.round), stage.name, self.kind,
               {k: j.job_id for k, j in jobs.items()}, ex.folder)
        return jobs

    def run(self, *, detach: bool = False, retry: bool = False) -> dict[str, int]:
        """Submit the round's work; returns tasks submitted per stage (empty when everything is done)."""
        if detach and self.kind != "slurm":
            raise ControllerError(f"--detach needs the slurm executor (this run uses {self.kind}: its jobs end "
                                  "with the controller)")
        stages = self.plan()
        train = next(s for s in stages if s.name == "train")
        if train.todo and self.manifest.data.validation is None:
            raise ControllerError(f"data.validation: required to train (human-human games for checkpoint "
                                  f"selection); the round has {len(train.tasks)} training tasks")
        self.check_previous(retry, stages)
        self.run_dir.make_private()
        self.claim()
        if self.kind == "slurm":
            return self._run_chained(stages, detach)
        with _terminate_as_exit():
            return self._run_in_turn()

    def claim(self) -> None:
        """Record the manifest this round runs (manifest.lock.json); refuse where another manifest file ran the
        same round in this run directory (two manifests with one experiment and workdir would overwrite each
        other's tables)."""
        recorded = read_manifest_lock(self.run_dir.manifest_lock)
        if recorded is not None and self.source is not None and recorded.get("source") not in (None, str(self.source)) \
                and recorded.get("round") == self.manifest.round:
            raise ControllerError(f"{self.run_dir.root}: round {self.manifest.round} here was run from another "
                                  f"manifest, {recorded['source']}; this is {self.source}: give it its own "
                                  "experiment name or workdir (or remove that run directory to start over)")
        atomic_write_text(json.dumps({"source": str(self.source) if self.source else None,
                                      "overrides": self.overrides, "round": self.manifest.round,
                                      "manifest": self.manifest.model_dump(mode="json")}, indent=1),
                          self.run_dir.manifest_lock)

    def _run_chained(self, stages: list[PlannedStage], detach: bool) -> dict[str, int]:
        arrays: dict[str, list[str]] = {}
        submitted: dict[str, dict[str, submitit.Job]] = {}
        for stage in stages:
            if not stage.todo:
                continue
            after = dependencies(stage.name, arrays)
            submitted[stage.name] = self.submit(stage, after)
            arrays[stage.name] = sorted({j.job_id.split("_")[0] for j in submitted[stage.name].values()})
            self.report(f"{stage.name}: {len(stage.todo)} of {len(stage.tasks)} tasks submitted as "
                        f"{', '.join(arrays[stage.name])}" + (f" (after {', '.join(after)})" if after else ""))
        if not submitted:
            self.report("every task is done: nothing submitted")
        elif detach:
            self.report(f"detached; follow it with: respect-hpc status {self.run_dir.root}")
        else:
            self._wait(submitted)
        return {name: len(jobs) for name, jobs in submitted.items()}

    def _run_in_turn(self) -> dict[str, int]:
        counts = {}
        for stage in build(self.manifest):
            mark_done(self.manifest, [stage])
            if not stage.todo:
                continue
            jobs = self.submit(stage, [])
            self.report(f"{stage.name}: {len(jobs)} of {len(stage.tasks)} tasks running ({self.kind})")
            counts[stage.name] = len(jobs)
            try:
                self._wait({stage.name: jobs})
            except (KeyboardInterrupt, SystemExit):  # the controller is stopped: its local jobs end with it
                _stop_local(list(jobs.values()))
                raise ControllerError(f"interrupted: the running {stage.name} tasks were stopped with the controller; "
                                      "run again to resume (what is done is kept)") from None
        if not counts:
            self.report("every task is done: nothing submitted")
        return counts

    def _wait(self, submitted: dict[str, dict[str, submitit.Job]]) -> None:
        """Wait for every job, showing per-stage progress; raise on the first stage with failures."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as progress:
            bars = {name: progress.add_task(name, total=len(jobs)) for name, jobs in submitted.items()}
            pending = {(name, key): job for name, jobs in submitted.items() for key, job in jobs.items()}
            while pending:
                for (name, key), job in list(pending.items()):
                    if job.done():
                        del pending[(name, key)]
                        progress.advance(bars[name])
                time.sleep(0.5 if pending else 0)
        for name in (s for s in ORDER if s in submitted):
            failures = []
            for key, job in submitted[name].items():
                if job.state.startswith("CANCELLED") or job.exception() is not None:
                    failures.append((key, job))
            if failures:
                key, job = failures[0]
                line = last_error_line(job.paths.stderr) or job.state.lower()
                raise ControllerError(f"{name}: {len(failures)} of {len(submitted[name])} tasks failed, e.g. {key}: "
                                      f"{line} (log: {job.paths.stderr}); later stages did not run")
