"""status's progress line for a running training task: its epoch of all and last validation exact match, read
from the metrics its last checkpoint wrote (real Parquet)."""

import polars as pl

import jobs.train
from respect_hpc.cli import views
from respect_hpc.cluster.controller import TaskStatus
from respect_hpc.config.loading import load_manifest
from respect_hpc.training.checkpoints import METRICS


def test_a_running_task_shows_its_epoch_and_last_validation(tmp_path, capsys):
    (tmp_path / "logs.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    path = tmp_path / "round.yaml"
    path.write_text("experiment: t\nround: 1\ndata: {interactions: [logs.jsonl]}\nmodel: {path: model}\n"
                    "variants: [{name: b-fft, feedback: binary, objective: fft}]\ntraining: {fft: {epochs: 5}}\n")
    m = load_manifest(path)
    assert jobs.train.progress(m, "b-fft/seed-1") == "no checkpoint yet"
    rows = [("default", 1, 1, 0.9, 0.9, 0.1, 1e-4, None, None), ("default", 2, 1, 0.8, 0.8, 0.1, 1e-4, None, None),
            ("default", 2, 1, None, None, None, None, 0.25, 1.1), ("default", 3, 2, 0.7, 0.7, 0.1, 1e-4, None, None)]
    out = jobs.train.task_dir(m, "b-fft", 1)
    out.root.mkdir(parents=True)
    pl.DataFrame(rows, schema=METRICS, orient="row").write_parquet(out.metrics)
    line = jobs.train.progress(m, "b-fft/seed-1")
    assert line == "epoch 2/5, step 3, validation exact match 0.250 (epoch 1)"
    views.status_table("t", [TaskStatus("train", "b-fft/seed-1", "running", line)])
    assert "train b-fft/seed-1: running: epoch 2/5, step 3, validation exact match 0.250" in capsys.readouterr().out
