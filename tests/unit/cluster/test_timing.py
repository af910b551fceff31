"""What a round cost: each task's own wall time per attempt (a requeued task adds a line), GPU-hours from its
stage's GPUs, read back past a half-written line; plan's estimate from the previous round's cost per task."""

import json
from types import SimpleNamespace

import pytest
import submitit

from respect_hpc.cli.commands import estimate
from respect_hpc.cluster.timing import Timed, TimedCheckpointable, timed
from respect_hpc.core.costs import costs, record_path


def double(x):
    return 2 * x


class Resumable(submitit.helpers.Checkpointable):
    def __call__(self, x):
        return x


def fail():
    raise ValueError("boom")


def test_each_attempt_is_recorded_with_its_gpus_and_outcome(tmp_path):
    record = record_path(tmp_path / "timings" / "train", "b-fft/seed-1")
    assert record.name == "b-fft__seed-1.jsonl"
    assert timed(double, record, 4)(21) == 42
    with pytest.raises(ValueError):
        timed(fail, record, 4)()
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(line["gpus"], line["ok"]) for line in lines] == [(4, True), (4, False)]
    with record.open("a") as handle:
        handle.write('{"started": 1, "elapsed_s": 36')  # a killed task's half-written line
    timed(double, record, 4)(1)  # the next attempt after the cut line is read whole
    lines += [json.loads(record.read_text().splitlines()[-1])]
    spent = costs(tmp_path / "timings", 3).row(0, named=True)
    elapsed = sum(line["elapsed_s"] for line in lines)
    assert (spent["round"], spent["stage"], spent["task"], spent["attempts"]) == (3, "train", "b-fft/seed-1", 3)
    assert spent["elapsed_h"] == pytest.approx(elapsed / 3600)
    assert spent["gpu_hours"] == pytest.approx(4 * elapsed / 3600)


def test_a_checkpointable_task_stays_checkpointable_and_its_requeue_is_timed(tmp_path):
    assert type(timed(double, tmp_path / "r.jsonl", 0)) is Timed  # not requeued by submitit: no checkpoint
    wrapped = timed(Resumable(), tmp_path / "r.jsonl", 2)
    assert isinstance(wrapped, TimedCheckpointable)
    again = wrapped.checkpoint(5)
    assert isinstance(again, submitit.helpers.DelayedSubmission) and isinstance(again.function, TimedCheckpointable)
    assert again.args == (5,) and again.function.gpus == 2 and isinstance(again.function.call, Resumable)


def test_plan_estimates_from_the_previous_rounds_cost_per_task(tmp_path):
    from respect_hpc.core.rundir import RunDir

    run = RunDir(tmp_path / "run")
    m = SimpleNamespace(round=2, run_dir=run)
    stages = [SimpleNamespace(name="train", todo=[1, 2, 3]), SimpleNamespace(name="select", todo=[1])]
    assert estimate(m, stages) == "GPU-hours: no estimate (round 1 has no measured select, train tasks)"
    for stage, key, seconds, gpus in (("train", "b-fft/seed-1", 3600, 4), ("train", "b-fft/seed-2", 7200, 4),
                                      ("select", "select", 36, 0)):
        record = record_path(run.timings(1) / stage, key)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"started": 0, "elapsed_s": seconds, "gpus": gpus, "ok": True}) + "\n")
    # train: (4 + 8) / 2 = 6 GPU-hours a task, three tasks; select: none
    assert estimate(m, stages) == ("GPU-hours: about 18.00 for the 4 tasks to run (round 1's measured cost per "
                                   "task of each stage)")
    assert estimate(SimpleNamespace(round=0, run_dir=run), stages) == "GPU-hours: no estimate (no earlier round " \
                                                                       "measured)"
