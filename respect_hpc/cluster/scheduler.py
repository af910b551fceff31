"""What the controller submitted and what became of it: a lock, job records, task states.

The run directory (core/rundir.py) names the files: ``controller.lock`` (who is submitting now: pid, host,
since) and each round's ``jobs.json`` (every submission: stage, task key -> job id, log folder).

Task states come from the scheduler (squeue for live jobs, sacct for ended ones)
for Slurm jobs, and from the process table for local ones; a task whose
output is current is done whatever the scheduler says. What Slurm jobs cost (elapsed time, GPUs allocated,
every attempt) comes from sacct too.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from respect_hpc.core.errors import RespectError
from respect_hpc.core.io import atomic_write_text
from respect_hpc.core.text import clip, printable

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "READY"}
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class LockError(RespectError, RuntimeError):
    """Another controller holds the run directory."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    """Whether a process runs: a killed one whose parent died too may linger as a zombie until reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: the signal answered
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class RunLock:
    """An exclusive lock file; a lock left by a controller that is gone (same host, dead pid) is taken over."""

    def __init__(self, path: Path, report=print):
        self.path, self.report = path, report

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._stale_or_refuse()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(mine)
            return self
        raise LockError(f"{self.path}: could not take the lock")

    def _stale_or_refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            holder = {}
        who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
            self.report(f"stale lock: {self.path} was left by {who}, which is gone; taking it over")
            self.path.unlink(missing_ok=True)
            return
        raise LockError(f"{self.path}: another controller ({who}) is submitting this run; wait for it, or "
                        "remove the file if you are sure it is gone")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _write_json(path: Path, data) -> None:
    atomic_write_text(json.dumps(data, indent=1), path)


def read_jobs(path: Path) -> list[dict]:
    """A round's job records (``path``: its jobs.json); a damaged file is set aside (never a crash): its tasks
    count as not submitted, and their outputs alone decide what is done."""
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
        if isinstance(records, list) and all(isinstance(r, dict) and isinstance(r.get("tasks"), dict)
                                             and {"stage", "executor", "folder"} <= r.keys() for r in records):
            return records
        problem = "not a list of job records"
    except (ValueError, UnicodeDecodeError) as exc:
        problem = str(exc)
    damaged = path.with_name(f"{path.name}.damaged")
    os.replace(path, damaged)
    print(printable(f"warning: {path} is damaged ({clip(problem)}); set aside as {damaged}: the tasks it recorded "
                    "count as not submitted (check the scheduler for jobs of this round still running)"),
          file=sys.stderr)
    return []


def record(path: Path, stage: str, executor: str, tasks: dict[str, str], folder: Path) -> None:
    """Add one submission (an array of ``tasks``: key -> job id) to a round's job records (``path``)."""
    _write_json(path, read_jobs(path) + [
        {"stage": stage, "executor": executor, "tasks": tasks, "folder": str(folder), "submitted": _now()}])


def latest_tasks(path: Path) -> dict[tuple[str, str], dict]:
    """(stage, task key) -> its newest submission: job id, executor, log folder."""
    latest = {}
    for submission in read_jobs(path):
        for key, job_id in submission["tasks"].items():
            latest[(submission["stage"], key)] = {"job_id": job_id, "executor": submission["executor"],
                                                  "folder": submission["folder"]}
    return latest


@dataclass(frozen=True)
class SchedulerState:
    state: str
    reason: str = ""


def _expand(job_id: str) -> list[str]:
    """``12_[0-3,7]`` -> 12_0 ... 12_3, 12_7 (sacct shows pending array tasks collapsed)."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(%\d+)?\]", job_id)
    if not match:
        return [job_id]
    out = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        out += [f"{match.group(1)}_{i}" for i in range(int(low), int(high or low) + 1)]
    return out


def slurm_states(job_ids: list[str]) -> dict[str, SchedulerState]:
    """States of Slurm jobs and array tasks, from sacct and squeue (:func:`read_states`)."""
    if not job_ids:
        return {}
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    sacct = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State,Reason"],
                           capture_output=True, text=True)
    squeue = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T|%r"], capture_output=True, text=True)
    return read_states(sacct.stdout if sacct.returncode == 0 else None, squeue.stdout)


def read_states(sacct: str | None, squeue: str) -> dict[str, SchedulerState]:
    """Task states from what ``sacct -n -P -X -o JobID,State,Reason`` and ``squeue -h -r -o %i|%T|%r`` print
    (``sacct``: None where accounting did not answer): squeue's for the jobs slurmctld still holds (the live
    truth), sacct's for the others. Accounting lags the controller, so around a requeue sacct can still show
    the ended attempt of a job that squeue already lists as pending again."""
    found: dict[str, SchedulerState] = {}
    for job, state, reason in _fields(sacct or ""):
        for one in _expand(job):
            found[one] = SchedulerState(state.split()[0] if state else "UNKNOWN", reason)
    for job, state, reason in _fields(squeue):
        found[job] = SchedulerState(state, reason)
    return found


def _fields(output: str) -> list[tuple[str, str, str]]:
    """``JOB|STATE|REASON`` lines of sacct -P or squeue -o as triples."""
    return [tuple((line.split("|") + ["", "", ""])[:3]) for line in output.splitlines() if line.strip()]


def slurm_usage(job_ids: list[str]) -> str | None:
    """What ``sacct -n -P -X -D -o JobID,ElapsedRaw,AllocTRES`` prints for the jobs (every attempt of each:
    ``-D`` keeps the ones a requeue replaced), or None where accounting does not answer."""
    if not job_ids:
        return ""
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    try:
        sacct = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", ids, "-o", "JobID,ElapsedRaw,AllocTRES"],
                               capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return sacct.stdout if sacct.returncode == 0 else None


def read_usage(sacct: str) -> dict[str, list[tuple[int, int]]]:
    """Job or array task id -> (elapsed seconds, GPUs allocated) of each attempt, from :func:`slurm_usage`'s
    lines. GPUs are AllocTRES's ``gres/gpu=N`` (or its typed ``gres/gpu:TYPE=N`` where only that is given);
    an attempt that never started has no elapsed time."""
    usage: dict[str, list[tuple[int, int]]] = {}
    for job, elapsed, tres in _fields(sacct):
        counts = {typed: int(n) for typed, n in re.findall(r"gres/gpu(:[^=,]+)?=(\d+)", tres)}
        gpus = counts.get("", max(counts.values(), default=0))
        for one in _expand(job):
            usage.setdefault(one, []).append((int(elapsed) if elapsed.isdigit() else 0, gpus))
    return usage


def slurm_costs(jobs: Path, round_: int):
    """Per (stage, task) of a round's Slurm submissions (``jobs``: its jobs.json), as :data:`~respect_hpc.core.
    costs.COSTS`: attempts, wall hours and GPU-hours from sacct's ElapsedRaw and AllocTRES, every submission and
    requeue of the task counted; None where the round submitted nothing to Slurm or accounting does not answer."""
    import polars as pl

    from respect_hpc.core.costs import COSTS

    submitted = [(r["stage"], key, job) for r in read_jobs(jobs) if r["executor"] == "slurm"
                 for key, job in r["tasks"].items()]
    text = slurm_usage([job for *_, job in submitted]) if submitted else None
    if text is None:
        return None
    usage, attempts = read_usage(text), {}
    for stage, key, job in submitted:
        attempts.setdefault((stage, key), []).extend(usage.get(job, []))
    rows = [(round_, stage, key, len(a), sum(e for e, _ in a) / 3600, sum(e * g for e, g in a) / 3600)
            for (stage, key), a in attempts.items() if a]
    return pl.DataFrame(rows, schema=COSTS, orient="row")


def local_state(job_id: str) -> SchedulerState:
    """A local job's id is its controller process: running while that process lives."""
    return SchedulerState("RUNNING" if _alive(int(job_id)) else "ENDED")


def log_path(folder: str, job_id: str) -> Path:
    """A task's stderr log, where submitit writes it."""
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=0).stderr


def last_error_line(log: Path, errors_only: bool = False) -> str:
    """The last error line of a task's stderr log; else its last line (or '' with ``errors_only``)."""
    if not log.is_file():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip() and not line.startswith(("srun:", "slurmstepd:"))]  # the scheduler's own notes
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line) or "error" in line.lower()]
    if errors_only and not errors:
        return ""
    return re.sub(r"^[\w.]+(Error|Exception): ", "", (errors or lines or [""])[-1])

