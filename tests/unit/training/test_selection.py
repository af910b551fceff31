"""Checkpoint selection (hand-made validation curves) and sweep cells in the manifest."""

import polars as pl
import pytest

from respect_hpc.config.loading import ManifestError, load_manifest
from respect_hpc.training.selection import CURVES, select_checkpoints


def curves(rows):
    return pl.DataFrame(rows, schema=list(CURVES.names()), orient="row").cast(dict(CURVES))


def test_best_exact_match_then_lower_loss_then_earlier_epoch():
    table = select_checkpoints(curves([
        ("b-fft", "default", 1, 1, 0.50, 1.0),
        ("b-fft", "default", 1, 2, 0.60, 0.9),
        ("b-fft", "default", 2, 1, 0.60, 0.8),   # same score, lower loss: wins
        ("b-fft", "default", 2, 3, 0.60, 0.8),   # same score and loss, later epoch
        ("t-rl", "default", 1, 1, 0.30, 0.5),
        ("t-rl", "default", 1, 2, 0.30, 0.5),    # full tie: the earlier epoch wins
    ]), round_=2)
    rows = {r["variant"]: r for r in table.iter_rows(named=True)}
    assert (rows["b-fft"]["seed"], rows["b-fft"]["epoch"]) == (2, 1)
    assert (rows["t-rl"]["seed"], rows["t-rl"]["epoch"]) == (1, 1)
    assert rows["b-fft"]["seeds"] == 2 and rows["b-fft"]["mean_val_exact_match"] == pytest.approx(0.60)
    assert set(table["round"]) == {2} and table["chosen"].all()


def test_sweep_cells_are_compared_by_mean_and_spread_over_seeds():
    table = select_checkpoints(curves([
        ("b-fft", "lr-a", 1, 1, 0.40, 1.0), ("b-fft", "lr-a", 2, 1, 0.60, 1.0),
        ("b-fft", "lr-b", 1, 1, 0.55, 1.0), ("b-fft", "lr-b", 2, 1, 0.45, 1.0),
    ]), round_=1)
    rows = {r["cell"]: r for r in table.iter_rows(named=True)}
    assert rows["lr-a"]["chosen"] and not rows["lr-b"]["chosen"]   # the single best checkpoint is in lr-a
    assert rows["lr-a"]["mean_val_exact_match"] == pytest.approx(0.50)
    assert rows["lr-a"]["std_val_exact_match"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["lr-b"]["std_val_exact_match"] == pytest.approx(0.0707, abs=1e-4)


def _manifest(tmp_path, sweep: str):
    (tmp_path / "logs.parquet").write_bytes(b"")
    (tmp_path / "model").mkdir(exist_ok=True)
    path = tmp_path / "m.yaml"
    path.write_text(f"experiment: s\nround: 1\ndata: {{interactions: [logs.parquet]}}\nmodel: {{path: model}}\n"
                    f"variants: [{{name: b-fft, feedback: binary, objective: fft}}]\n{sweep}")
    return path


def test_manifest_sweep_cells_override_hyperparameters(tmp_path):
    m = load_manifest(_manifest(tmp_path, "sweep: {learning_rate: [0.0001, 0.0003], lora_r: [8, 16]}\n"))
    cells = m.cells()
    assert list(cells) == ["learning_rate-0.0001_lora_r-8", "learning_rate-0.0001_lora_r-16",
                           "learning_rate-0.0003_lora_r-8", "learning_rate-0.0003_lora_r-16"]
    hp = m.objective(m.variants[0], "learning_rate-0.0003_lora_r-16")
    assert (hp.learning_rate, hp.lora_r, hp.epochs) == (0.0003, 16, 20)
    assert load_manifest(_manifest(tmp_path, "")).cells() == {"default": {}}
    with pytest.raises(ManifestError, match=r"m.yaml:\d+: sweep: .*sweep.lora_rank: not a training hyperparameter"):
        load_manifest(_manifest(tmp_path, "sweep: {lora_rank: [8]}\n"))
