"""The round controller with submitit's local executor: a whole tiny round, reruns, failures, the lock.

Every stage runs for real in subprocesses (tiny random-weight Idefics2, real tangram
images where present); the Slurm side of the controller is in test_slurm.py.
"""

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import cli, round_inputs, write_logged_round

from respect_hpc.cluster.controller import Controller, ControllerError
from respect_hpc.config.loading import load_manifest
from respect_hpc.core.costs import costs
from respect_hpc.core.io import adapter_problem


def test_plan_lists_every_stage_and_task(tmp_path, taught_decoder):
    m = load_manifest(write_logged_round(tmp_path, taught_decoder[0]))
    stages = Controller(m).plan()
    assert [(s.name, len(s.tasks), len(s.todo)) for s in stages] == [
        ("ingest", 1, 1), ("decode", 2, 2), ("merge", 1, 1), ("train", 2, 2), ("select", 1, 1), ("metrics", 1, 1)]
    out = cli("plan", tmp_path / "round.yaml")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-1%2" in out.stdout and "#SBATCH --ntasks-per-node=1" in out.stdout
    assert re.search(r"│ train\s+│\s+2 │\s+0 │\s+2 │", out.stdout), out.stdout  # tasks, done, to do
    assert "lineage: logged turns each variant trains on (known after the ingest stage)" in " ".join(
        out.stdout.split())
    import jobs.ingest

    jobs.ingest.run(m)
    out = cli("plan", tmp_path / "round.yaml")
    turns = pl.read_parquet(tmp_path / "runs" / "tiny" / "data" / "turns.parquet")
    active = turns.filter((pl.col("utterance").str.strip_chars() != "") & (pl.col("action") != "")).height
    assert re.search(rf"│ b-fft\s+│ every policy\s+│ sft\s+│\s+0 │\s+{active} │", out.stdout), out.stdout



@pytest.mark.slow
def test_a_tiny_round_end_to_end_with_the_local_executor_then_a_rerun_submits_nothing(tmp_path, taught_decoder):
    manifest = write_logged_round(tmp_path, taught_decoder[0])
    m = load_manifest(manifest)
    lines = []
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True, mode=0o755)  # made by hand, readable by all: the controller makes it private
    counts = Controller(m, report=lines.append).run()
    assert counts == {"ingest": 1, "decode": 2, "merge": 1, "train": 2, "select": 1, "metrics": 1}
    assert run.stat().st_mode & 0o777 == 0o700  # submitit's job pickles live in logs/
    selection = pl.read_parquet(run / "round-1" / "selection.parquet")
    assert selection.select("variant", "cell", "seeds", "chosen").rows() == [("b-fft", "default", 2, True)]
    chosen = selection.row(0, named=True)
    policy = run / "round-1" / "policies" / "b-fft"
    source = run / "round-1" / "train" / "b-fft" / f"seed-{chosen['seed']}" / "epochs" / f"epoch-{chosen['epoch']:03d}"
    assert (policy / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()
    assert (run / "round-1" / "metrics" / "round_metrics.parquet").is_file()
    recorded = json.loads((run / "round-1" / "jobs.json").read_text())
    assert [r["stage"] for r in recorded] == ["ingest", "decode", "merge", "train", "select", "metrics"]
    assert {r.state for r in Controller(m).status()} == {"done"}
    assert Controller(m, report=lines.append).run() == {}
    assert lines[-1] == "every task is done: nothing submitted"
    done = cli("status", run)
    assert done.returncode == 0 and re.search(r"│ train\s+│\s+2 │", done.stdout), done.stdout
    # each task recorded its own wall time (one attempt each; no GPU here, so no GPU-hours)
    spent = costs(run / "round-1" / "timings", 1)
    assert sorted(spent["stage"].unique()) == ["decode", "ingest", "merge", "metrics", "select", "train"]
    assert spent.height == 8 and spent["attempts"].to_list() == [1] * 8 and (spent["elapsed_h"] > 0).all()
    assert spent["gpu_hours"].sum() == 0
    assert "wall time and GPU-hours" in " ".join(done.stdout.split())
    assert re.search(r"│ train b-fft\s+│\s+2 │\s+2 │", done.stdout), done.stdout

    # a damaged selected adapter is never trusted: the task that wrote it is redone, and the selection after it
    weights = source / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert sorted(r.state for r in Controller(m).status() if r.stage == "train") == ["done", "out of date"]
    counts = Controller(m, report=lines.append).run()
    assert counts["train"] == 1  # the same seed retrains to the same weights: the placed policy stays current
    assert adapter_problem(source) is None
    assert (policy / "adapter_model.safetensors").read_bytes() == weights.read_bytes()
    # truncated tables are made again by the stages that wrote them, never a crash naming no file
    for table in (run / "data" / "turns.parquet", run / "round-1" / "feedback.parquet"):
        table.write_bytes(table.read_bytes()[:200])
    todo = {s.name for s in Controller(m).plan() if s.todo}
    assert {"ingest", "merge"} <= todo
    Controller(m, report=lines.append).run()
    assert pl.read_parquet(run / "round-1" / "feedback.parquet").height > 0
    assert {s.name for s in Controller(m).plan() if s.todo} == set()
    # a deleted policy is placed again by the selection stage alone
    (policy / "adapter_model.safetensors").unlink()
    counts = Controller(m, report=lines.append).run()
    assert "train" not in counts and counts["select"] == 1
    assert (policy / "adapter_model.safetensors").read_bytes() == weights.read_bytes()


@pytest.mark.slow
def test_a_failed_task_stops_later_stages_and_retry_resubmits_only_what_failed(tmp_path, taught_decoder):
    adapter = tmp_path / "previous-b-kto"
    adapter.mkdir()
    manifest = write_logged_round(tmp_path, taught_decoder[0], extra_variants=(
        f"  - {{name: b-kto, feedback: binary, objective: kto, previous_adapter: {adapter}}}\n"))
    m = load_manifest(manifest)
    with pytest.raises(ControllerError, match=r"train: 2 of 4 tasks failed, e.g. b-kto/seed-1: variant b-kto: "
                                              r"continues from the previous round's adapter, but .* holds none"):
        Controller(m).run()
    run = tmp_path / "runs" / "tiny"
    assert not (run / "round-1" / "selection.parquet").exists()
    states = {(r.stage, r.key): r for r in Controller(m).status()}
    assert states[("train", "b-fft/seed-1")].state == "done"
    failed = states[("train", "b-kto/seed-2")]
    assert failed.state == "failed" and "holds none" in failed.detail and failed.log.endswith("_log.err")
    assert states[("select", "select")].state == "not submitted"
    with pytest.raises(ControllerError, match=r"2 tasks of round 1 failed .* run again with --retry"):
        Controller(m).run()
    shutil.copytree(run / "round-1" / "train" / "b-fft" / "seed-1" / "epochs" / "epoch-001", adapter,
                    dirs_exist_ok=True)
    counts = Controller(m).run(retry=True)
    assert counts == {"train": 2, "select": 1, "metrics": 1}  # the b-fft tasks are done: not resubmitted
    assert pl.read_parquet(run / "round-1" / "selection.parquet")["variant"].to_list() == ["b-fft", "b-kto"]


def test_the_seed_round_trains_the_seed_policy_that_round_one_continues_from(tmp_path, taught_decoder):
    """Round 0 without logs: train (the seed policy, on D_0 alone) and select, then a KTO variant of round 1
    validates against the exported policy and trains from it."""
    inputs = round_inputs(tmp_path, games=10, model=taught_decoder[0])
    common = (f"workdir: {tmp_path / 'runs'}\n"
              f"model: {{path: {inputs['model']}, dtype: fp32}}\n"
              "seeds: [1]\n"
              "training:\n"
              "  seed: {epochs: 1, effective_batch: 8, micro_batch: 4}\n"
              "  kto: {epochs: 1, effective_batch: 8, micro_batch: 4, warmup_steps: 0}\n"
              "  zero_stage: null\n"
              "cluster: {executor: local}\n")
    data = f"seed_data: {inputs['d0']}, validation: {inputs['validation']}, images: {inputs['images']}"
    seed_round = tmp_path / "round0.yaml"
    seed_round.write_text(f"experiment: seeded\nround: 0\ndata: {{{data}}}\n{common}")
    m = load_manifest(seed_round)
    assert [(s.name, len(s.tasks)) for s in Controller(m).plan()] == [("train", 1), ("select", 1)]
    assert Controller(m, report=lambda _: None).run() == {"train": 1, "select": 1}
    run = tmp_path / "runs" / "seeded" / "round-0"
    assert pl.read_parquet(run / "selection.parquet").select("variant", "chosen").rows() == [("sft", True)]
    assert adapter_problem(run / "policies" / "sft") is None
    examples = pl.read_parquet(run / "train" / "sft" / "seed-1" / "metrics.parquet")
    assert examples.filter(pl.col("loss").is_not_null()).height >= 1

    round_one = tmp_path / "round1.yaml"
    round_one.write_text(f"experiment: seeded\nround: 1\ndata: {{interactions: [{inputs['logs']}], {data}}}\n"
                         "variants: [{name: b-kto, feedback: binary, objective: kto, policies: [sft]}]\n" + common)
    m1 = load_manifest(round_one)  # would be refused without round 0's policy
    assert m1.previous_adapter(m1.variants[0]) == run / "policies" / "sft"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.mark.slow
def test_sigterm_to_the_controller_ends_its_local_jobs_and_status_says_interrupted(tmp_path, taught_decoder):
    """`run` with the local executor stopped by SIGTERM (a real process): its training jobs end with it (they save a
    checkpoint on the way), the run ends with one line, and status calls the tasks interrupted, not failed."""
    import signal
    import subprocess
    import sys
    import time

    manifest = write_logged_round(tmp_path, taught_decoder[0])
    manifest.write_text(manifest.read_text().replace("fft: {epochs: 1,", "fft: {epochs: 200,"))
    controller = subprocess.Popen([sys.executable, "-m", "respect_hpc.cli", "run", str(manifest)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = tmp_path / "runs" / "tiny" / "round-1" / "jobs.json"
    deadline = time.monotonic() + 300
    while not (records.is_file() and "train" in records.read_text()):
        assert controller.poll() is None and time.monotonic() < deadline, controller.communicate()
        time.sleep(0.5)
    train = next(r for r in json.loads(records.read_text()) if r["stage"] == "train")
    jobs = [int(j) for j in train["tasks"].values()]  # a local job's id is its process
    time.sleep(5)
    assert all(_alive(pid) for pid in jobs)
    controller.send_signal(signal.SIGTERM)
    _, err = controller.communicate(timeout=120)
    assert controller.returncode == 2 and err.strip().splitlines()[-1] == (
        "error: interrupted: the running train tasks were stopped with the controller; run again to resume (what is "
        "done is kept)")
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in jobs):
        assert time.monotonic() < deadline, "the local jobs outlived their controller"
        time.sleep(0.5)
    status = cli("status", tmp_path / "runs" / "tiny")
    assert re.search(r"│ train\s+│\s+0 │\s+0 │\s+0 │\s+0 │\s+0 │\s+2 │", status.stdout), status.stdout
