"""submitit array jobs on a real single-node Slurm (slurm/cluster.sh), with accounting for job states.

The fixture starts the cluster when it is installed and this runs as root, and stops
what it started; elsewhere the tests skip, saying why.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import submitit

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "cluster.sh"
ROOT = Path(os.environ.get("RESPECT_SLURM_ROOT", "/tmp/respect-slurm"))


def _ping(conf: Path) -> bool:
    env = {**os.environ, "SLURM_CONF": str(conf)}
    return conf.is_file() and subprocess.run(["scontrol", "ping"], env=env, capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    conf = ROOT / "etc" / "slurm.conf"
    if shutil.which("scontrol") is None:
        pytest.skip("Slurm is not installed (make test installs it as root: slurm/cluster.sh install)")
    started = False
    if not _ping(conf):
        if os.geteuid() != 0:
            pytest.skip("no Slurm controller reachable, and starting one needs root")
        subprocess.run([str(SCRIPT), "start"], check=True, timeout=300)
        started = True
    # Jobs inherit this environment (sbatch exports it): the cluster's config, and this folder on the
    # path so that tasks can unpickle the functions defined here.
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = str(conf)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved["PYTHONPATH"]]))
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
    from test_decode import cli, write_manifest

    model, logs = taught_decoder
    manifest = write_manifest(tmp_path, model, [logs], shards=3)
    text = manifest.read_text() + "cluster:\n  executor: slurm\n  partition: debug\n"
    manifest.write_text(text)
    done = cli("decode", manifest, "--submit")
    assert done.returncode == 0, done.stderr
    assert "decode: 3 shards submitted as" in done.stderr and "(slurm)" in done.stderr
    parts = sorted((tmp_path / "runs" / "test" / "feedback").glob("*/round-1/part-*-of-00003.parquet"))
    assert len(parts) == 6  # 3 shards x (binary, ternary)
    assert (tmp_path / "runs" / "test" / "round-1" / "feedback.parquet").is_file()
    rerun = cli("decode", manifest, "--submit")  # every part current: the tasks skip
    assert rerun.returncode == 0 and "decoded feedback" in rerun.stdout
