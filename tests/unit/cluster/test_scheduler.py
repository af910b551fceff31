"""The Slurm logic against what Slurm prints, without a Slurm: task states from recorded ``sacct`` and ``squeue``
output (as the single-node Slurm of the e2e tests printed it), the status each state becomes, the afterok
chain of a round, array splits and the controller lock. The same logic runs against a real slurmctld in
tests/e2e/test_slurm.py."""

import json
import os
import subprocess
import sys

import pytest

from jobs.registry import Task
from respect_hpc.cluster.controller import TaskStatus, array_chunks, dependencies, task_status, with_upstream_failures
from respect_hpc.cluster.scheduler import LockError, RunLock, SchedulerState, latest_tasks, read_states, record

# `sacct -n -P -X -j 14,16,31,32 -o JobID,State,Reason` while a round ran: a finished array, one with failed
# tasks, an array whose pending tasks sacct shows collapsed, a cancelled dependant, a preempted task
SACCT = """14_0|COMPLETED|Dependency
14_1|COMPLETED|Dependency
16_1|COMPLETED|Dependency
16_2|FAILED|Dependency
16_0|COMPLETED|BeginTime
31_[2-4%2]|PENDING|Dependency
31_0|RUNNING|None
31_1|RUNNING|None
33|CANCELLED by 0|DependencyNeverSatisfied
32_1|PREEMPTED|None
"""
# `squeue -h -r -j ... -o %i|%T|%r` at the same moment: the preempted task already requeued
SQUEUE = """31_2|PENDING|Dependency
31_3|PENDING|Dependency
31_4|PENDING|Dependency
31_0|RUNNING|None
31_1|RUNNING|None
32_1|PENDING|BeginTime
"""


def test_states_from_recorded_sacct_and_squeue():
    states = read_states(SACCT, SQUEUE)
    assert states["14_1"] == SchedulerState("COMPLETED", "Dependency")
    assert states["16_2"].state == "FAILED"
    assert [states[f"31_{i}"].state for i in range(5)] == ["RUNNING", "RUNNING", "PENDING", "PENDING", "PENDING"]
    assert states["33"] == SchedulerState("CANCELLED", "DependencyNeverSatisfied")  # "by 0" dropped
    assert states["32_1"] == SchedulerState("PENDING", "BeginTime")  # squeue's live state wins over sacct's


def test_collapsed_pending_arrays_expand_even_without_squeue():
    states = read_states("40_[0-2,5]|PENDING|Dependency\n", "")
    assert sorted(states) == ["40_0", "40_1", "40_2", "40_5"]


def test_without_accounting_squeue_alone_answers():
    states = read_states(None, SQUEUE)
    assert states["31_0"].state == "RUNNING" and "14_0" not in states


@pytest.fixture
def record_of(tmp_path):
    def make(job_id: str, log: str | None = None) -> dict:
        folder = tmp_path / "logs" / "train" / "%j"
        if log is not None:
            err = tmp_path / "logs" / "train" / job_id / f"{job_id}_0_log.err"
            err.parent.mkdir(parents=True, exist_ok=True)
            err.write_text(log)
        return {"job_id": job_id, "executor": "slurm", "folder": str(folder)}
    return make


def test_each_scheduler_state_becomes_a_status_with_its_reason(record_of):
    states = read_states(SACCT, SQUEUE)
    failed = task_status("train", "b-kto/seed-1", record_of("16_2", "srun: error: task 0\nTrainingError: variant "
                                                                   "b-kto: holds none\n"), states["16_2"])
    assert (failed.state, failed.detail) == ("failed", "variant b-kto: holds none")
    assert failed.log.endswith("16_2/16_2_0_log.err")
    stale = task_status("train", "b-fft/seed-1", record_of("14_1"), states["14_1"])
    assert stale.state == "out of date" and "a run redoes it" in stale.detail
    cancelled = task_status("select", "select", record_of("33"), states["33"])
    assert (cancelled.state, cancelled.detail) == ("cancelled", "DependencyNeverSatisfied")
    pending = task_status("train", "b-fft/seed-3", record_of("31_3"), states["31_3"])
    assert (pending.state, pending.detail, pending.active) == ("pending", "Dependency", True)
    assert task_status("train", "x", record_of("31_0"), states["31_0"]).state == "running"


def test_a_cancelled_task_without_a_reason_names_the_failure_upstream():
    rows = with_upstream_failures([TaskStatus("train", "b-kto/seed-1", "failed", "holds none"),
                                   TaskStatus("select", "select", "cancelled", "cancelled"),
                                   TaskStatus("metrics", "metrics", "cancelled", "cancelled")])
    assert rows[1].detail == "an upstream task failed (train b-kto/seed-1): its dependency was never satisfied"
    assert rows[2].detail == "cancelled"  # metrics reads ingest only: not the training failure's doing


def test_each_array_waits_for_the_arrays_of_the_stages_it_reads():
    arrays = {"ingest": ["10"], "decode": ["11"], "merge": ["12"], "train": ["13", "14"], "select": ["15"]}
    assert dependencies("decode", arrays) == ["10"]
    assert dependencies("train", arrays) == ["11", "10", "12"]
    assert dependencies("select", arrays) == ["11", "10", "12", "13", "14"]
    assert dependencies("metrics", arrays) == ["10"]
    assert dependencies("merge", {"train": ["13"]}) == []  # nothing upstream was submitted: no dependency


def test_array_chunks_split_at_max_array_size():
    tasks = [Task(f"t{i}", print) for i in range(2500)]
    chunks = array_chunks(tasks, 1001)
    assert [len(c) for c in chunks] == [1001, 1001, 498]
    assert [t for c in chunks for t in c] == tasks


def test_job_records_keep_each_tasks_newest_submission(tmp_path):
    path = tmp_path / "round-1" / "jobs.json"
    record(path, "train", "slurm", {"b-fft/seed-1": "20_0", "b-fft/seed-2": "20_1"}, tmp_path / "logs")
    record(path, "train", "slurm", {"b-fft/seed-2": "25_0"}, tmp_path / "logs")
    latest = latest_tasks(path)
    assert {k: v["job_id"] for k, v in latest.items()} == {("train", "b-fft/seed-1"): "20_0",
                                                           ("train", "b-fft/seed-2"): "25_0"}


def test_lock_refuses_a_second_controller_and_takes_over_a_stale_one(tmp_path):
    notes = []
    lock = tmp_path / "controller.lock"
    with RunLock(lock, report=notes.append):
        with pytest.raises(LockError, match=r"another controller \(pid \d+ on .*\) is submitting this run"):
            with RunLock(lock):
                pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                "since": "2026-01-01T00:00:00+00:00"}))
    with RunLock(lock, report=notes.append):
        pass
    assert notes and notes[0].startswith(f"stale lock: {lock} was left by pid")
    assert not lock.exists()


# `sacct -n -P -X -D -j 40,41,42 -o JobID,ElapsedRaw,AllocTRES`: an array task requeued once (two attempts, -D),
# a GPU array whose TRES names the generic and the typed count, a task whose TRES gives only the typed count,
# pending tasks shown collapsed (never started: no TRES)
USAGE = """40_0|12|billing=1,cpu=1,mem=4G,node=1
40_0|95|billing=1,cpu=1,mem=4G,node=1
41_0|3600|billing=8,cpu=8,gres/gpu=4,gres/gpu:a100=4,mem=256G,node=1
41_1|1800|billing=8,cpu=8,gres/gpu:h100=2,mem=256G,node=1
42_[0-1]|0|
"""


def test_usage_counts_every_attempt_and_the_gpus_slurm_allocated():
    from respect_hpc.cluster.scheduler import read_usage

    usage = read_usage(USAGE)
    assert usage["40_0"] == [(12, 0), (95, 0)]
    assert usage["41_0"] == [(3600, 4)] and usage["41_1"] == [(1800, 2)]
    assert usage["42_0"] == usage["42_1"] == [(0, 0)]


def test_slurm_costs_sum_attempts_per_task_of_every_submission(tmp_path, monkeypatch):
    """The round's jobs.json names the tasks; sacct (its recorded output: no Slurm here) gives their usage."""
    import respect_hpc.cluster.scheduler as scheduler

    jobs = tmp_path / "jobs.json"
    record(jobs, "train", "slurm", {"b-fft/seed-1": "41_0", "b-fft/seed-2": "41_1"}, tmp_path)
    record(jobs, "ingest", "slurm", {"ingest": "40_0"}, tmp_path)
    record(jobs, "train", "slurm", {"b-fft/seed-1": "42_0"}, tmp_path)  # a retry still pending: an attempt, no time yet
    monkeypatch.setattr(scheduler, "slurm_usage", lambda ids: USAGE)
    spent = scheduler.slurm_costs(jobs, 1).sort("stage", "task")
    assert spent.select("stage", "task", "attempts").rows() == [
        ("ingest", "ingest", 2), ("train", "b-fft/seed-1", 2), ("train", "b-fft/seed-2", 1)]
    assert spent["elapsed_h"].to_list() == [107 / 3600, 1.0, 0.5]
    assert spent["gpu_hours"].to_list() == [0.0, 4.0, 1.0]
    monkeypatch.setattr(scheduler, "slurm_usage", lambda ids: None)  # accounting does not answer
    assert scheduler.slurm_costs(jobs, 1) is None
    local = tmp_path / "local.json"
    record(local, "train", "local", {"b-fft/seed-1": "1234"}, tmp_path)
    assert scheduler.slurm_costs(local, 1) is None
