"""The sbatch script of a stage's array, rendered without a Slurm installation by submitit's own renderer
(``_make_sbatch_string``, a private function this test pins): against a golden script, and from a machine
whose PATH has no srun or sbatch. The Slurm tests (tests/e2e) check that submitit submits the same script."""

import sys
from pathlib import Path

import pytest
from conftest import cli

from respect_hpc.cluster.executors import sbatch_script
from respect_hpc.config.loading import ManifestError, load_manifest

GOLDEN = Path(__file__).parent / "golden"


def manifest(tmp_path: Path) -> Path:
    (tmp_path / "logs.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    path = tmp_path / "round.yaml"
    path.write_text(f"""experiment: golden
round: 2
workdir: {tmp_path / 'runs'}
data: {{interactions: [logs.jsonl]}}
model: {{path: model}}
variants: [{{name: b-fft, feedback: binary, objective: fft}}]
cluster:
  executor: slurm
  partition: gpu
  account: lab
  qos: normal
  constraint: a100|h100
  setup: ['module load cuda/12.4', 'source $HOME/venvs/respect/bin/activate']
  additional_parameters: {{reservation: lab-week, gres: 'gpu:a100:4', exclusive: true}}
  mail: {{user: me@lab.org, types: [FAIL, REQUEUE]}}
  stages:
    train: {{gpus: 4, cpus: 8, mem_gb: 200, time_min: 720, nodes: 2, max_parallel: 3}}
""")
    return path


def test_the_train_array_renders_as_the_golden_script(tmp_path):
    script = sbatch_script(load_manifest(manifest(tmp_path)), "train", 6)
    script = script.replace(str(tmp_path), "TMP").replace(sys.executable, "PYTHON")
    assert script == (GOLDEN / "train.sbatch").read_text()


def test_plan_shows_the_scripts_where_there_is_no_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no srun, no sbatch, no sacct
    done = cli("plan", manifest(tmp_path), "--executor", "slurm")
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --array=0-2%3" in done.stdout and "#SBATCH --gpus-per-node=4" in done.stdout
    assert "# setup\nmodule load cuda/12.4\n" in done.stdout and "#SBATCH --mail-type=FAIL,REQUEUE" in done.stdout


@pytest.mark.parametrize("line, expected", [
    ('  setup: ["module load cuda\\nrm -rf ~"]\n', "holds control characters '\\n': one shell line each"),
    ("  additional_parameters: {time: 5}\n", "cluster.additional_parameters: unknown sbatch option 'time': expected "
                                            "one of the options respect-hpc does not set itself"),
    ("  additional_parameters: {reservaton: x}\n", "cluster.additional_parameters: unknown sbatch option 'reservaton' "
                                                  "(did you mean 'reservation'?)"),
    ("  additional_parameters: {reservation: 'x y'}\n", "cluster.additional_parameters: reservation: unsafe value "
                                                       "'x y'"),
    ("  additional_parameters: {exclude: '--wrap=sh'}\n", "cluster.additional_parameters: exclude: unsafe value"),
    ("  mail: {user: 'me;rm', types: [FAIL]}\n", "cluster.mail.user: "),
    ("  mail: {user: me, types: [SOMETIMES]}\n", "cluster.mail.types[0]: unknown types 'SOMETIMES'"),
])
def test_cluster_set_up_lines_and_options_are_checked(tmp_path, line, expected):
    path = manifest(tmp_path)
    text = path.read_text()
    path.write_text(text[:text.index("  setup:")] + line + text[text.index("  stages:"):])
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert any(expected in problem for problem in info.value.problems), info.value.problems
