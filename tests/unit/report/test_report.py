"""Offline report: every metric against a hand computation, plots that are not blank, the HTML in a browser."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import REPO, game, write_jsonl
from PIL import Image

from respect_hpc.core.costs import record_path
from respect_hpc.core.io import atomic_write_parquet
from respect_hpc.data.datasets import source_counts
from respect_hpc.data.logs import ingest
from respect_hpc.report.audit import confusion, decoder_quality, heuristic_agreement
from respect_hpc.report.build import build, write
from respect_hpc.report.turn_metrics import TURN_EVAL, similarity, turn_metrics

ARTIFACTS = REPO / "runs" / "artifacts"
R2 = 1 / math.sqrt(2)
EMBEDDINGS = pl.DataFrame({"image": ["a", "b", "c"], "embedding": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]})

# (selected, deselected, reference_selected, reference_deselected, expected Sim of eq. 3, expected Sim as the
# official notebook's clicks_sim: the select side alone)
SIMILARITY_CASES = {
    "same image": (["a"], [], ["a"], [], 1.0, 1.0),
    "orthogonal images": (["a"], [], ["b"], [], 0.0, 0.0),
    "pairs are averaged": (["a", "b"], [], ["c"], [], R2, R2),
    "one-sided on both sides": (["a"], [], [], ["b"], -1.0, -1.0),
    "matched select, missing deselect": (["b"], ["a"], ["b"], [], 0.0, 1.0),
    "two missing clicks": (["a", "c"], [], [], [], -1.0, -1.0),
    "two sides pooled": (["a"], ["b"], ["c"], ["b"], (R2 + 1) / 2, R2),
    "deselects only": ([], ["a"], [], ["a"], 1.0, None),
    "no clicks at all": ([], [], [], [], None, None),
    "image without embedding": (["z"], [], ["a"], [], None, None),
}


def evals_of(cases: dict, policy="bp", round_=1, feedback=None) -> pl.DataFrame:
    return pl.DataFrame([{"game_turn_id": name, "round": round_, "policy": policy, "selected": s, "deselected": d,
                          "reference_selected": rs, "reference_deselected": rd,
                          "feedback": None if feedback is None else feedback[i], "correct": None}
                         for i, (name, (s, d, rs, rd, _, _)) in enumerate(cases.items())], schema=TURN_EVAL)


def test_similarity_edge_cases():
    evals = evals_of(SIMILARITY_CASES)
    got = {row["game_turn_id"]: row for row in similarity(evals, EMBEDDINGS).iter_rows(named=True)}
    for name, (*_, eq3, notebook) in SIMILARITY_CASES.items():
        for column, expected in (("similarity", eq3), ("similarity_notebook", notebook)):
            if expected is None:
                assert got[name][column] is None, (name, column)
            else:
                assert got[name][column] == pytest.approx(expected), (name, column)


def test_turn_metrics_by_hand():
    cases = {k: SIMILARITY_CASES[k] for k in ("same image", "orthogonal images", "pairs are averaged",
                                              "one-sided on both sides")}
    evals = evals_of(cases, feedback=[1, 1, 0, -1])
    row = turn_metrics(evals, EMBEDDINGS, n_resamples=2000).row(0, named=True)
    assert row["turns"] == 4
    assert row["exact_match"] == pytest.approx(1 / 4)
    assert row["similarity"] == pytest.approx((1 + 0 + R2 - 1) / 4)
    assert row["positive_feedback_rate"] == pytest.approx(2 / 4)
    for name in ("exact_match", "similarity", "positive_feedback"):
        assert row[f"{name}_ci_low"] <= row[name if name != "positive_feedback" else "positive_feedback_rate"] \
            <= row[f"{name}_ci_high"]
    again = turn_metrics(evals, EMBEDDINGS, n_resamples=2000).row(0, named=True)
    assert again == row  # reproducible for a fixed seed


PAIRS = pl.DataFrame({  # human, decoded
    "kind": ["ternary"] * 8, "round": [1] * 8,
    "human":   [1, 1, 1, 0, 0, -1, -1, -1],
    "decoded": [1, 1, -1, 1, 0, 1, -1, -1],
}, schema_overrides={"human": pl.Int8, "decoded": pl.Int8})


def test_the_public_human_eval_layout_is_scored_as_the_official_notebook(tmp_path):
    """The annotator's correctness is the exact match (even where a differs from the clicks they made), only a
    'yes' satisfaction is positive, and a* comes from delta_clicks against currently_selected (a click on a
    selected image deselects it)."""
    rows = [("g0", 0, ["a"], [], "yes", "yes", [], ["a"]),
            ("g1", 0, ["a"], [], "no", "no", [], ["b"]),
            ("g2", 3, ["b"], ["a"], "yes", "partial_correctness_satisfaction", ["a"], ["b"])]
    pl.DataFrame([{"game_id": g, "turn_id": t, "round": 1, "policy_name": "bp", "selected": s, "deselected": d,
                   "correctness": c, "feedback": f, "currently_selected": now, "delta_clicks": clicks}
                  for g, t, s, d, c, f, now, clicks in rows],
                 schema_overrides={"currently_selected": pl.List(pl.String), "deselected": pl.List(pl.String)}
                 ).write_parquet(tmp_path / "human_eval.parquet")
    EMBEDDINGS.write_parquet(tmp_path / "embeddings.parquet")
    report = build([tmp_path / "human_eval.parquet"], tmp_path / "embeddings.parquet", n_resamples=200)
    row = report.tables["turn_metrics"].row(0, named=True)
    assert (row["policy"], row["round"], row["turns"]) == ("bp", 1, 3)
    assert row["exact_match"] == pytest.approx(2 / 3)  # a = a* in g0 alone: 1/3 had the clicks decided
    assert row["positive_feedback_rate"] == pytest.approx(1 / 3)
    # Sim per turn: g0 1; g1 0 (a, b orthogonal); g2 select side 1, deselect of a one-sided -1: eq. 3 pools
    # them (0), the notebook keeps the select side (1)
    assert row["similarity"] == pytest.approx(1 / 3)
    assert row["similarity_notebook"] == pytest.approx(2 / 3)


def test_decoder_quality_by_hand():
    quality = decoder_quality(PAIRS).row(0, named=True)
    # decoded >= 0: rows 0,1,3,4,5 -> human >= 0 in 0,1,3,4 -> precision 4/5
    assert quality["precision_positive"] == pytest.approx(4 / 5)
    # human negative: rows 5,6,7 -> decoded >= 0 only in row 5 -> false-positive rate 1/3
    assert quality["false_positive_rate"] == pytest.approx(1 / 3)
    assert quality["accuracy"] == pytest.approx(5 / 8)
    counts = {(h, d): n for _, _, h, d, n in confusion(PAIRS).iter_rows()}
    assert counts == {(1, 1): 2, (1, -1): 1, (0, 1): 1, (0, 0): 1, (-1, 1): 1, (-1, -1): 2}


def test_heuristic_agreement_by_hand(tmp_path):
    turns = ingest([write_jsonl(tmp_path / "logs.jsonl", [game("g1")])]).turns
    # g1: Select A (A not a target: heuristic -1), Deselect A select B (+1), Select D (+1, no follow-up)
    feedback = pl.DataFrame({"game_turn_id": ["g1_0", "g1_1"], "kind": ["binary"] * 2, "round": [1, 1],
                             "policy": ["bp", "bp"], "label": [1, 1]}, schema_overrides={"label": pl.Int8})
    row = heuristic_agreement(feedback, turns).row(0, named=True)
    assert row["windows"] == 2
    assert row["heuristic_agreement"] == pytest.approx(1 / 2)
    assert row["heuristic_positive_rate"] == pytest.approx(1 / 2)
    assert row["decoded_positive_rate"] == pytest.approx(1.0)


def make_run(root: Path, logs: Path) -> Path:
    """A hand-made run directory with the tables the stages write."""
    result = ingest([logs])
    atomic_write_parquet(result.interactions, root / "data" / "interactions.parquet")
    atomic_write_parquet(result.turns, root / "data" / "turns.parquet")
    for variant, seed, curve in (("b-fft", 1, [0.2, 0.4, 0.3]), ("b-fft", 2, [0.1, 0.2, 0.6]),
                                 ("t-rl", 1, [0.3, 0.3, 0.3])):
        atomic_write_parquet(pl.DataFrame({"step": [10, 20, 30], "epoch": [1, 2, 3], "val_exact_match": curve,
                                           "val_loss": [1.0, 0.9, 0.8]}),
                             root / "round-1" / "train" / variant / f"seed-{seed}" / "metrics.parquet")
    examples = pl.DataFrame({"source": ["log", "log", "log", "d0"], "policy": ["sft", "sft", "bp", "human"],
                             "round": [0, 0, 1, 0], "label": [1, -1, 1, 1]})
    atomic_write_parquet(source_counts(examples), root / "round-1" / "train" / "t-rl" / "seed-1" / "sources.parquet")
    atomic_write_parquet(pl.DataFrame({"round": [1, 1], "variant": ["b-fft", "t-rl"], "cell": ["default"] * 2,
                                       "seed": [2, 1], "epoch": [3, 1], "val_exact_match": [0.6, 0.3],
                                       "val_loss": [0.8, 1.0]}), root / "round-1" / "selection.parquet")
    for stage, key, attempts in (("train", "b-fft/seed-1", [(1800, 4), (1800, 4)]), ("train", "b-fft/seed-2", [(3600, 4)]),
                                 ("train", "t-rl/seed-1", [(360, 4)]), ("decode", "shard-00000-of-00001", [(720, 1)])):
        record = record_path(root / "round-1" / "timings" / stage, key)  # as the tasks write them
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text("".join(json.dumps({"started": 0, "elapsed_s": e, "gpus": g, "ok": True}) + "\n"
                                  for e, g in attempts))
    return root


def test_report_tables_plots_and_html(tmp_path):
    logs = write_jsonl(tmp_path / "logs.jsonl", [game("g1"), game("g2", end=0), game("g3", round=2)])
    run = make_run(tmp_path / "run", logs)
    evals = evals_of({k: SIMILARITY_CASES[k] for k in ("same image", "orthogonal images")}, feedback=[1, -1])
    evals.write_parquet(tmp_path / "turn_eval.parquet")
    decoder = pl.DataFrame({"game_turn_id": ["g1_0", "g1_1", "g2_0"], "predictions": [1, -1, 1],
                            "labels": [-1, -1, 1], "text": ["", "", ""]})
    decoder.write_parquet(tmp_path / "feedback_decoder_binary.parquet")
    EMBEDDINGS.write_parquet(tmp_path / "embeddings.parquet")

    report = build([run, tmp_path / "turn_eval.parquet", tmp_path / "feedback_decoder_binary.parquet"],
                   tmp_path / "embeddings.parquet", n_resamples=500)
    assert set(report.tables) == {"round_metrics", "turn_metrics", "decoder_confusion", "decoder_quality",
                                  "validation_curves", "sweep", "selection", "training_data", "costs"}
    # wall hours and GPU-hours per stage and training variant: b-fft 2 tasks, 3 attempts, 2 h on 4 GPUs
    assert report.tables["costs"].select("stage", "variant", "tasks", "attempts", "elapsed_h", "gpu_hours").rows() == [
        ("decode", None, 1, 1, 0.2, 0.2), ("train", "b-fft", 2, 3, 2.0, 8.0), ("train", "t-rl", 1, 1, 0.1, 0.4)]
    data = report.tables["training_data"]
    assert data.select("variant", "seed", "source", "policy", "logged_round", "examples", "positive",
                       "negative").rows() == [("t-rl", 1, "d0", "human", 0, 1, 1, 0),
                                              ("t-rl", 1, "log", "bp", 1, 1, 1, 0),
                                              ("t-rl", 1, "log", "sft", 0, 2, 1, 1)]
    sweep = {r["variant"]: r for r in report.tables["sweep"].iter_rows(named=True)}
    assert sweep["b-fft"]["seeds"] == 2 and sweep["b-fft"]["val_exact_match_mean"] == pytest.approx(0.5)
    assert sweep["b-fft"]["val_exact_match_std"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    quality = report.tables["decoder_quality"].row(0, named=True)
    assert (quality["kind"], quality["round"], quality["precision_positive"]) == ("binary", 1, 0.5)
    assert any("no decoded feedback table" in m for m in report.missing)

    page = write(report, tmp_path / "out")
    for name in ("success_and_turns", "language", "turn_metrics", "confusion_binary", "validation_curves"):
        png = np.asarray(Image.open(tmp_path / "out" / "plots" / f"{name}.png").convert("L"))
        assert png.std() > 5, f"{name}.png looks blank"
    assert (tmp_path / "out" / "tables" / "round_metrics.csv").read_text().startswith("policy,round,games")
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 5 and "Missing" in text and "src=\"http" not in text


def test_bad_inputs_are_listed_and_the_rest_renders(tmp_path):
    logs = write_jsonl(tmp_path / "logs.jsonl", [game("g1"), game("g2", end=0, policy_name="b-fft")])  # mixed
    old = make_run(tmp_path / "old", write_jsonl(tmp_path / "old.jsonl", [game("g1")]))
    frame = pl.read_parquet(old / "data" / "interactions.parquet")
    frame.write_parquet(old / "data" / "interactions.parquet", metadata={"respect_hpc.schema_version": "0"})
    evals_of({"x": SIMILARITY_CASES["image without embedding"]}).write_parquet(tmp_path / "turn_eval.parquet")
    EMBEDDINGS.write_parquet(tmp_path / "embeddings.parquet")
    report = build([old, logs, tmp_path / "turn_eval.parquet", tmp_path / "nowhere"],
                   tmp_path / "embeddings.parquet", n_resamples=200)
    missing = "\n".join(report.missing)
    assert f"{old}: run directory of schema version 0; this respect-hpc reads version 1: skipped" in missing
    assert f"{tmp_path / 'embeddings.parquet'}: no embedding for 1 images (z)" in missing
    assert f"{tmp_path / 'nowhere'}: no such file or folder" in missing
    assert report.tables["round_metrics"]["games"].to_list() == [1, 1]  # the logs still count, any policy
    assert report.tables["turn_metrics"]["similarity"].to_list() == [None]
    write(report, tmp_path / "out")


def test_report_opens_in_a_headless_browser(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it as root: apt-get install chromium)")
    logs = write_jsonl(tmp_path / "logs.jsonl", [game("g1"), game("g2", end=0)])
    page = write(build([make_run(tmp_path / "run", logs)], n_resamples=200), tmp_path / "out")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape[:2] == (1600, 1200) and image.std() > 5
