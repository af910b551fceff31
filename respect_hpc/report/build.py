"""Offline aggregation: run directories and public logs -> tables, plots and one HTML page.

Sources are run directories (``<workdir>/<experiment>``) and files or folders of
public-layout tables: interaction or turn logs, ``feedback_decoder_binary`` /
``feedback_decoder_ternary`` (decoded and human labels), ``human_eval``, and turn
evaluations with reference actions (:data:`turn_metrics.TURN_EVAL`). Whatever a
source lacks is listed under "missing", and the report renders the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from respect_hpc.core.costs import costs
from respect_hpc.core.io import SCHEMA_VERSION
from respect_hpc.core.rundir import RunDir
from respect_hpc.data.feedback import FEEDBACK
from respect_hpc.data.logs import IngestError, explode_turns, read_interactions, source_files
from respect_hpc.data.tables import INTERACTIONS, TURNS
from respect_hpc.report.audit import confusion, decoder_quality, heuristic_agreement
from respect_hpc.report.round_metrics import N_RESAMPLES, round_metrics
from respect_hpc.report.turn_metrics import EMBEDDINGS, TURN_EVAL, missing_embeddings, turn_metrics

TRAINING_DATA = pl.Schema({"round": pl.Int64, "variant": pl.String, "cell": pl.String, "seed": pl.Int64,
                           "source": pl.String, "policy": pl.String, "logged_round": pl.Int64, "examples": pl.UInt32,
                           "positive": pl.UInt32, "negative": pl.UInt32})
TRAINING = pl.Schema({"round": pl.Int64, "variant": pl.String, "cell": pl.String, "seed": pl.Int64,
                      "epoch": pl.Int64, "val_exact_match": pl.Float64, "val_loss": pl.Float64})
_LABEL_WORDS = {"positive": 1, "neutral": 0, "negative": -1, "1": 1, "0": 0, "-1": -1}


@dataclass
class Collected:
    """Everything the sources hold, normalised, and what they lacked."""

    interactions: list[pl.DataFrame] = field(default_factory=list)
    feedback: list[pl.DataFrame] = field(default_factory=list)
    labelled: list[pl.DataFrame] = field(default_factory=list)  # kind, game_turn_id, round, decoded, human
    evals: list[pl.DataFrame] = field(default_factory=list)
    training: list[pl.DataFrame] = field(default_factory=list)
    training_data: list[pl.DataFrame] = field(default_factory=list)
    selection: list[pl.DataFrame] = field(default_factory=list)
    costs: list[pl.DataFrame] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _schema_version(path: Path) -> int | None:
    value = pl.read_parquet_metadata(path).get("respect_hpc.schema_version")
    return int(value) if value is not None else None


def _collect_run(root: Path, found: Collected) -> None:
    """A run directory's tables, read through its layout (core/rundir.py)."""
    run = RunDir(root)
    version = _schema_version(run.data.interactions)
    if version != SCHEMA_VERSION:
        found.missing.append(f"{root}: run directory of schema version {version}; this respect-hpc reads version "
                             f"{SCHEMA_VERSION}: skipped")
        return
    found.interactions.append(pl.read_parquet(run.data.interactions).cast(dict(INTERACTIONS)))
    rounds = run.rounds()
    for kind, path_of, pattern in (("decoded feedback", run.round_feedback, "feedback.parquet"),
                                   ("selection", run.selection, "selection.parquet")):
        tables = [p for r in rounds if (p := path_of(r)).is_file()]
        if not tables:
            found.missing.append(f"{root}: no {kind} table (round-*/{pattern})")
        for path in tables:
            if path_of == run.round_feedback:
                found.feedback.append(pl.read_parquet(path).cast(dict(FEEDBACK)))
            else:
                found.selection.append(pl.read_parquet(path).select(TRAINING.names()).cast(dict(TRAINING)))
    tasks = [t for t in run.trained_tasks() if t.folder.metrics.is_file()]
    if not tasks:
        found.missing.append(f"{root}: no training metrics (round-*/train/<variant>/seed-<s>/metrics.parquet)")
    for task in tasks:
        epochs = pl.read_parquet(task.folder.metrics).filter(pl.col("val_exact_match").is_not_null())
        found.training.append(epochs.select(
            pl.lit(task.round).alias("round"), pl.lit(task.variant).alias("variant"), pl.lit(task.cell).alias("cell"),
            pl.lit(task.seed).alias("seed"), "epoch", "val_exact_match", "val_loss").cast(dict(TRAINING)))
        if task.folder.sources.is_file():
            found.training_data.append(pl.read_parquet(task.folder.sources).rename({"round": "logged_round"}).select(
                pl.lit(task.round).alias("round"), pl.lit(task.variant).alias("variant"),
                pl.lit(task.cell).alias("cell"), pl.lit(task.seed).alias("seed"),
                "source", "policy", "logged_round", "examples", "positive", "negative").cast(dict(TRAINING_DATA)))
    found.evals += [turn_evals(pl.read_parquet(p)) for r in rounds if (p := run.turn_eval(r)).is_file()]
    found.costs += [costs(run.timings(r), r).with_columns(run=pl.lit(root.name)) for r in rounds]


def _label(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.String).str.to_lowercase().replace_strict(_LABEL_WORDS, default=None,
                                                                           return_dtype=pl.Int8)


def turn_evals(frame: pl.DataFrame) -> pl.DataFrame:
    """A table of turn evaluations (:data:`TURN_EVAL`); one without annotators' verdicts has none."""
    if "correct" not in frame.columns:
        frame = frame.with_columns(correct=pl.lit(None, pl.Boolean))
    return frame.select(TURN_EVAL.names()).cast(dict(TURN_EVAL))


# human_eval's satisfaction strings, as the official notebook reads them (yes: positive feedback)
SATISFACTION = {"yes": 1, "no": -1, "incorrect_satisfaction": 0, "partial_correctness_satisfaction": 0}


def human_eval_turns(frame: pl.DataFrame) -> pl.DataFrame:
    """The public ``human_eval`` table as turn evaluations: the annotators' ``correctness`` (yes/no) is the
    exact match, ``feedback`` (yes, no, *_satisfaction) the satisfaction (only yes is positive), and where it
    has ``delta_clicks`` (the annotator's clicks from ``currently_selected``) the reference action a*."""
    columns = set(frame.columns)
    clicks = pl.col("delta_clicks").cast(pl.List(pl.String)) if "delta_clicks" in columns else None
    before = pl.col("currently_selected").cast(pl.List(pl.String)) if "currently_selected" in columns else None
    have = clicks is not None and before is not None
    none = pl.lit(None, pl.List(pl.String))
    return frame.select(
        pl.format("{}_{}", "game_id", "turn_id").alias("game_turn_id"), pl.col("round").cast(pl.Int64),
        pl.col("policy_name").alias("policy"), "selected", "deselected",
        (clicks.list.set_difference(before) if have else none).alias("reference_selected"),
        (clicks.list.set_intersection(before) if have else none).alias("reference_deselected"),
        pl.col("feedback").cast(pl.String).str.to_lowercase().replace_strict(SATISFACTION, default=None,
                                                                              return_dtype=pl.Int8).alias("feedback"),
        pl.col("correctness").cast(pl.String).str.to_lowercase().replace_strict({"yes": True, "no": False},
                                                                                 default=None,
                                                                                 return_dtype=pl.Boolean)
        .alias("correct"),
    ).cast(dict(TURN_EVAL))


def _columns(path: Path) -> set[str]:
    if path.suffix == ".parquet":
        return set(pl.read_parquet_schema(path))
    with path.open(encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "{}")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return set()
    return set(record) if isinstance(record, dict) else set()


def _collect_file(path: Path, found: Collected) -> None:
    """One loose table, by the columns it has; interaction logs go through the ingest checks."""
    columns = _columns(path)
    read = (lambda: pl.read_parquet(path)) if path.suffix == ".parquet" else (
        lambda: pl.read_ndjson(path, infer_schema_length=None))
    if {"predictions", "labels", "game_turn_id"} <= columns:  # public feedback_decoder_* layout
        frame = read()
        kind = "ternary" if "ternary" in path.name else "binary"
        found.labelled.append(frame.select(pl.lit(kind).alias("kind"), "game_turn_id",
                                           decoded=_label("predictions"), human=_label("labels")))
    elif "reference_selected" in columns:
        found.evals.append(turn_evals(read()))
    elif {"correctness", "feedback", "selected"} <= columns:  # public human_eval layout
        found.evals.append(human_eval_turns(read()))
    else:
        interactions, refused, _, _ = read_interactions([path], quarantine=True, policies=None)
        found.interactions.append(interactions)
        found.missing += [f"{r['file']}: row {r['row']}: {r['field']}: {r['reason']} (left out)"
                          for r in refused.iter_rows(named=True)]


def collect(sources: list[str | Path]) -> Collected:
    found = Collected()
    for source in map(Path, sources):
        if RunDir(source).data.interactions.is_file():
            _collect_run(source, found)
            continue
        try:
            files = source_files([source])
        except IngestError as exc:
            found.missing.append(str(exc))
            continue
        for path in files:
            try:
                _collect_file(path, found)
            except (IngestError, pl.exceptions.PolarsError) as exc:
                found.missing.append(f"{path}: not readable as a report table ({str(exc).splitlines()[0]})")
    return found


def _concat(frames: list[pl.DataFrame], schema: pl.Schema) -> pl.DataFrame:
    return pl.concat(frames, how="vertical_relaxed").cast(dict(schema)) if frames else pl.DataFrame(schema=schema)


@dataclass
class Report:
    tables: dict[str, pl.DataFrame]
    missing: list[str]


def build(sources: list[str | Path], embeddings: Path | None = None, *, seed: int = 0,
          n_resamples: int = N_RESAMPLES) -> Report:
    """Every report table that the sources allow, and the list of what they lack."""
    found = collect(sources)
    tables: dict[str, pl.DataFrame] = {}
    interactions = _concat(found.interactions, INTERACTIONS)
    repeated = interactions.height - interactions["game_id"].n_unique()
    if repeated:
        found.missing.append(f"{repeated} games appear in more than one source: each is counted once")
        interactions = interactions.unique("game_id", keep="first", maintain_order=True)
    turns = explode_turns(interactions) if interactions.height else pl.DataFrame(schema=TURNS)
    if interactions.height:
        tables["round_metrics"] = round_metrics(interactions, turns, seed=seed, n_resamples=n_resamples)
    else:
        found.missing.append("no interaction logs: no round metrics")

    evals = _concat(found.evals, TURN_EVAL)
    table = None
    if embeddings is not None:
        table = pl.read_parquet(embeddings).select(EMBEDDINGS.names()).cast(dict(EMBEDDINGS))
        lacking = missing_embeddings(evals, table)
        if lacking:
            found.missing.append(f"{embeddings}: no embedding for {len(lacking)} images "
                                 f"({', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''}): "
                                 "their turns have no similarity")
    elif evals.height:
        found.missing.append("no --embeddings table: no similarity Sim(a, a*)")
    if evals.height:
        tables["turn_metrics"] = turn_metrics(evals, table, seed=seed, n_resamples=n_resamples)
    else:
        found.missing.append("no turn evaluations (reference actions or human_eval): no turn-level metrics")

    feedback = _concat(found.feedback, FEEDBACK)
    if feedback.height and turns.height:
        tables["heuristic_agreement"] = heuristic_agreement(feedback, turns)
    labelled = pl.concat(found.labelled) if found.labelled else None
    if labelled is not None:
        rounds = turns.select("game_turn_id", "round")
        pairs = labelled.join(rounds, on="game_turn_id", how="left").drop_nulls(["decoded", "human"])
        tables["decoder_confusion"] = confusion(pairs)
        tables["decoder_quality"] = decoder_quality(pairs)
    else:
        found.missing.append("no human feedback labels (feedback_decoder_binary/ternary): no decoder confusion")

    training = _concat(found.training, TRAINING)
    if training.height:
        tables["validation_curves"] = training.sort("round", "variant", "cell", "seed", "epoch")
        best = training.group_by("round", "variant", "cell", "seed").agg(pl.col("val_exact_match").max())
        tables["sweep"] = best.group_by("round", "variant", "cell").agg(
            pl.len().alias("seeds"), pl.col("val_exact_match").mean().alias("val_exact_match_mean"),
            pl.col("val_exact_match").std().alias("val_exact_match_std"),
            pl.col("val_exact_match").min().alias("val_exact_match_min"),
            pl.col("val_exact_match").max().alias("val_exact_match_max")).sort("round", "variant", "cell")
    training_data = _concat(found.training_data, TRAINING_DATA)
    if training_data.height:
        tables["training_data"] = training_data.sort("round", "variant", "cell", "seed", "source", "policy",
                                                     "logged_round")
    selection = _concat(found.selection, TRAINING)  # the columns of a selection row it shows
    if selection.height:
        tables["selection"] = selection.sort("round", "variant")
    spent = pl.concat(found.costs) if found.costs else pl.DataFrame()
    if spent.height:  # per run, round, stage and (training) variant
        part = pl.when(pl.col("stage") == "train").then(pl.col("task").str.split("/").list.first()).otherwise(None)
        tables["costs"] = (spent.with_columns(variant=part)
                           .group_by("run", "round", "stage", "variant", maintain_order=True)
                           .agg(pl.len().alias("tasks"), pl.col("attempts").sum(), pl.col("elapsed_h").sum(),
                                pl.col("gpu_hours").sum())
                           .sort("run", "round", "stage", "variant", nulls_last=True))
    return Report(tables, found.missing)


def write(report: Report, out: Path) -> Path:
    """Tables as Parquet and CSV, plots as PNG, and report.html that embeds them all."""
    from respect_hpc.core.io import atomic_write_parquet
    from respect_hpc.report.plots import render

    (out / "tables").mkdir(parents=True, exist_ok=True)
    for name, table in report.tables.items():
        atomic_write_parquet(table, out / "tables" / f"{name}.parquet")
        table.write_csv(out / "tables" / f"{name}.csv")
    plots = render(report.tables, out / "plots")
    from respect_hpc.report.html import page
    html = out / "report.html"
    html.write_text(page(report.tables, plots, report.missing), encoding="utf-8")
    return html
