"""submitit array jobs on a real single-node Slurm (slurm/cluster.sh), with accounting for job states.

The fixture starts the cluster when it is installed and this runs as root, and stops
what it started; elsewhere the tests skip, saying why.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from conftest import REPO

SCRIPT = REPO / "slurm" / "cluster.sh"
ROOT = Path(os.environ.get("RESPECT_SLURM_ROOT", "/tmp/respect-slurm"))


def _ping(conf: Path) -> bool:
    env = {**os.environ, "SLURM_CONF": str(conf)}
    return conf.is_file() and subprocess.run(["scontrol", "ping"], env=env, capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    conf = ROOT / "etc" / "slurm.conf"
    # CI sets RESPECT_REQUIRE_SLURM=1: there a missing cluster fails these tests instead of skipping them.
    unavailable = pytest.fail if os.environ.get("RESPECT_REQUIRE_SLURM") == "1" else pytest.skip
    if shutil.which("scontrol") is None:
        unavailable("Slurm is not installed (make test installs it as root: slurm/cluster.sh install)")
    started = False
    if not _ping(conf):
        if os.geteuid() != 0:
            unavailable("no Slurm controller reachable, and starting one needs root")
        subprocess.run([str(SCRIPT), "start"], check=True, timeout=300)
        started = True
    # Jobs inherit this environment (sbatch exports it): the cluster's config, and this folder and tests/ (its
    # conftest) on the path so that tasks can unpickle the functions defined here.
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = str(conf)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), str(REPO / "tests"),
                                                            saved["PYTHONPATH"]]))
    yield tmp_path_factory.mktemp("submitit")
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if started:
        subprocess.run([str(SCRIPT), "stop"], check=True, timeout=120)


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("task three fails")
    return x


def executor(folder: Path) -> submitit.SlurmExecutor:
    ex = submitit.SlurmExecutor(folder=folder, python=str(Path(os.sys.executable)))
    ex.update_parameters(partition="debug", time=5, cpus_per_task=1, mem="500M")
    return ex


def test_an_array_job_runs_and_accounting_sees_it(slurm):
    jobs = executor(slurm / "square").map_array(square, [1, 2, 3, 4])
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array, one sbatch
    assert [j.result() for j in jobs] == [1, 4, 9, 16]
    deadline = time.monotonic() + 60
    while {j.state for j in jobs} != {"COMPLETED"}:  # sacct lags a moment behind results
        assert time.monotonic() < deadline, [j.state for j in jobs]
        time.sleep(1)


def test_a_failing_task_is_reported_with_its_error(slurm):
    jobs = executor(slurm / "fail").map_array(fail_on_three, [1, 3])
    assert jobs[0].result() == 1
    with pytest.raises(submitit.core.utils.FailedJobError, match="task three fails"):
        jobs[1].result()


def test_decode_shards_run_as_one_array_on_slurm(slurm, taught_decoder, tmp_path):
    from conftest import cli, write_decode_round

    model, logs = taught_decoder
    manifest = write_decode_round(tmp_path, model, [logs], shards=3)
    text = manifest.read_text() + "cluster:\n  executor: slurm\n  partition: debug\n"
    manifest.write_text(text)
    done = cli("decode", manifest, "--submit")
    assert done.returncode == 0, done.stderr
    assert "decode: 3 job(s)" in done.stderr and "(slurm)" in done.stderr
    parts = sorted((tmp_path / "runs" / "test" / "feedback").glob("*/round-1/part-*-of-00003.parquet"))
    assert len(parts) == 6  # 3 shards x (binary, ternary)
    assert (tmp_path / "runs" / "test" / "round-1" / "feedback.parquet").is_file()
    rerun = cli("decode", manifest, "--submit")  # every part current: the tasks skip
    assert rerun.returncode == 0 and "decoded feedback" in rerun.stdout


def _wait_idle(controller, seconds: float = 600):
    """Wait until no task of the round is pending or running; returns the task states by (stage, key)."""
    deadline = time.monotonic() + seconds
    while True:
        rows = {(r.stage, r.key): r for r in controller.status()}
        if not any(r.active or r.state == "unknown" for r in rows.values()):  # unknown: sacct not caught up
            return rows
        assert time.monotonic() < deadline, [(k, r.state) for k, r in rows.items()]
        time.sleep(2)


@pytest.mark.slow
def test_a_tiny_round_on_slurm_with_a_failure_a_preemption_a_retry_and_a_rerun(slurm, tmp_path, taught_decoder):
    import json

    from conftest import write_logged_round

    from respect_hpc.cluster.controller import Controller, ControllerError
    from respect_hpc.cluster.scheduler import log_path
    from respect_hpc.config.loading import load_manifest

    adapter = tmp_path / "previous-b-kto"
    adapter.mkdir()
    manifest = write_logged_round(tmp_path, taught_decoder[0], executor="slurm", extra_variants=(
        f"  - {{name: b-kto, feedback: binary, objective: kto, previous_adapter: {adapter}}}\n"))
    # one game a step: epochs of many steps, so that the preemption most often lands inside one (the save
    # mid-epoch is tested without Slurm in test_train.py; here the signal may also land at an epoch's end)
    manifest.write_text(manifest.read_text().replace("fft: {epochs: 1, effective_batch: 8, micro_batch: 4,",
                                                     "fft: {epochs: 3, effective_batch: 2, micro_batch: 1,")
                        + "  partition: debug\n")
    m = load_manifest(manifest)
    controller = Controller(m)
    counts = controller.run(detach=True)
    assert counts == {"ingest": 1, "decode": 2, "merge": 1, "train": 4, "select": 1, "metrics": 1}
    round_dir = tmp_path / "runs" / "tiny" / "round-1"
    submissions = json.loads((round_dir / "jobs.json").read_text())
    arrays = {s["stage"]: {j.split("_")[0] for j in s["tasks"].values()} for s in submissions}
    assert all(len(ids) == 1 for ids in arrays.values())  # one sbatch per stage array
    train_job = next(iter(arrays["train"]))
    shown = subprocess.run(["scontrol", "show", "job", train_job], capture_output=True, text=True).stdout
    assert f"afterok:{next(iter(arrays['merge']))}" in shown

    # preempt a running training task with the signal Slurm sends before preemption or the time limit
    task = submissions[3]["tasks"]["b-fft/seed-1"]
    log = log_path(submissions[3]["folder"], task)
    deadline = time.monotonic() + 400
    while "step 10/" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline, f"the training task never reached step 10: {log}"
        assert not any(r.state == "failed" for r in controller.status()), [
            (r.stage, r.key, r.detail) for r in controller.status() if r.state == "failed"]
        time.sleep(0.5)
    # one try: scancel retries a job it finds in a transitional state every 5 s, and a retry after the requeue
    # would signal the new attempt before it can handle the signal
    try:
        subprocess.run(["scancel", "--signal=USR2", task], timeout=4)
    except subprocess.TimeoutExpired:
        pass

    states = _wait_idle(controller)
    text = log.read_text()
    preempted = states[("train", "b-fft/seed-1")]
    assert preempted.state == "done", (preempted, text)
    assert ("stopped at step" in text or "stopped after epoch" in text) and "resumed at step" in text, text
    assert states[("train", "b-fft/seed-2")].state == "done"
    failed = states[("train", "b-kto/seed-1")]
    assert failed.state == "failed" and "holds none" in failed.detail
    assert states[("select", "select")].state == "cancelled"  # its dependency failed: it never ran
    detail = states[("select", "select")].detail  # Slurm's reason, or (when sacct kept none) the failure upstream
    assert "Dependency" in detail or detail.startswith("an upstream task failed (train b-kto/seed-1)"), detail
    assert states[("metrics", "metrics")].state == "done"  # depends on ingest only
    from conftest import cli

    shown = cli("status", tmp_path / "runs" / "tiny")
    assert "train b-kto/seed-1: failed: variant b-kto: continues from the previous round's adapter" in shown.stdout
    assert "select select: cancelled" in shown.stdout
    # the round's cost from accounting: every attempt, the preempted task's requeue too (no GPUs here)
    assert "sacct's Elapsed and AllocTRES" in " ".join(shown.stdout.split()), shown.stdout
    attempts = re.search(r"│ train b-fft\s+│\s+2 │\s+(\d+) │\s+([\d.]+) │\s+0\.000 │", shown.stdout)
    assert attempts and int(attempts.group(1)) >= 3 and float(attempts.group(2)) > 0, shown.stdout

    with pytest.raises(ControllerError, match="run again with --retry"):
        controller.run()
    shutil.copytree(round_dir / "train" / "b-fft" / "seed-1" / "epochs" / "epoch-001", adapter, dirs_exist_ok=True)
    assert controller.run(retry=True) == {"train": 2, "select": 1}
    assert (round_dir / "policies" / "b-kto" / "adapter_config.json").is_file()
    assert controller.run() == {}  # everything done: nothing submitted


def test_the_simulated_setting_plans_on_slurm(slurm, tmp_path):
    """manifests/sim.yaml (its paths made absolute, its inputs written) plans as Slurm arrays, deployment
    included."""
    from respect_hpc.config.loading import load_manifest
    from respect_hpc.simulation.inputs import simulation_inputs

    repo = REPO
    kilogram = repo.parent / "shared" / "data" / "kilogram"
    if not (kilogram / "dense.json").is_file():
        pytest.skip(f"KiloGram data not found at {kilogram}")
    manifest = tmp_path / "sim.yaml"
    manifest.write_text((repo / "manifests" / "sim.yaml").read_text()
                        .replace("../../shared/data/kilogram", str(kilogram)).replace("../runs", str(tmp_path / "runs")))
    simulation_inputs(load_manifest(manifest, check_files=False))
    shown = subprocess.run([sys.executable, "-m", "respect_hpc.cli", "plan", str(manifest), "--executor", "slurm"],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    for stage in ("train", "select", "deploy", "collect"):
        assert f"{stage}: sbatch script of its array" in shown.stdout, stage
    assert shown.stdout.count("#SBATCH --array") >= 4
