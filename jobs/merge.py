"""Merge stage: the decode stage's parts -> the cross-round label cache and round-R/feedback.parquet.

Every part must exist, hold its shard's windows and carry its current spec (data/feedback.py refuses one that
does not, naming the rerun that fixes it). Kinds whose labels the manifest gives (``decoder.labels``, e.g.
the paper's own) come from that file; windows it has no label for are reported and not trained on.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from jobs.registry import Stage, Task
from respect_hpc.config.schema import Manifest
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata
from respect_hpc.core.text import log_console
from respect_hpc.data.feedback import (
    FEEDBACK,
    LABELS,
    MergeError,
    check_parts,
    decodable,
    plan_decoding,
    precomputed_labels,
)
from respect_hpc.domain.prompts import LABEL_VALUES
from respect_hpc.model.loading import model_fingerprint
from respect_hpc.training.tracking import TrackedRun, Tracking, run_name

KEY = "merge"
console = log_console()


def precomputed(manifest: Manifest) -> dict[str, Path]:
    """The feedback kinds the variants use whose labels the manifest gives instead of decoding them."""
    return {k: p for k, p in sorted(manifest.decoder.labels.items()) if k in manifest.feedback_kinds}


def plans(manifest: Manifest, n_shards: int):
    run = manifest.run_dir
    return plan_decoding(pl.read_parquet(run.data.turns), manifest.decoder, manifest.feedback_kinds,
                         model_fingerprint(manifest.decoder_model, run.fingerprint_memo), run.feedback,
                         manifest.round, n_shards)


def spec(manifest: Manifest, kind_plans, n_shards: int) -> str:
    given = precomputed(manifest)  # their windows come from the turns table
    return spec_hash({"parts": [spec_hash(p.spec(s, n_shards)) for p in kind_plans for s in range(n_shards)],
                      "labels": {k: file_digest(p) for k, p in given.items()},
                      "turns": file_digest(manifest.run_dir.data.turns) if given else None})


def done(manifest: Manifest) -> set[str]:
    path, n = manifest.run_dir.round_feedback(manifest.round), manifest.decoder.shards
    current = path.is_file() and parquet_metadata(path).get(SPEC_HASH_KEY) == spec(manifest, plans(manifest, n), n)
    return {KEY} if current else set()


def run(manifest: Manifest, n_shards: int) -> pl.DataFrame:
    """Check every part, update the label cache and write round-R/feedback.parquet; returns that table."""
    frames = []
    kind_plans = plans(manifest, n_shards)
    turns = pl.read_parquet(manifest.run_dir.data.turns)
    silent = turns.filter(pl.col("has_follow_up") & ~decodable()).height
    if silent:
        console.print(f"{silent} actions whose follow-up utterance is empty are not decoded (nor trained on), as the "
                      "official code")
    for kind_plan in kind_plans:
        specs = {s: kind_plan.spec(s, n_shards) for s in range(n_shards)}
        parts = check_parts(kind_plan.folder.parts(manifest.round), specs,
                            {s: set(kind_plan.shard_keys(s)) for s in specs})
        labels = pl.concat([kind_plan.earlier, *parts]).cast(dict(LABELS))
        atomic_write_parquet(labels, kind_plan.folder.labels)
        per_turn = kind_plan.windows.join(labels, on="key", how="left")
        unlabelled = per_turn.filter(pl.col("label").is_null())
        if unlabelled.height:
            raise MergeError(f"{kind_plan.folder.root}: {unlabelled.height} windows have no label, e.g. "
                             f"{unlabelled['game_turn_id'][0]}")
        frames.append(per_turn.with_columns(kind=pl.lit(kind_plan.kind), decoder_key=pl.lit(kind_plan.decoder_key)))
    frames += [_precomputed_feedback(manifest, kind, path) for kind, path in precomputed(manifest).items()]
    feedback = (pl.concat([f.select(pl.col(c) if c in f.columns else pl.lit(None, t).alias(c)
                                    for c, t in FEEDBACK.items()).cast(dict(FEEDBACK)) for f in frames])
                if frames else pl.DataFrame(schema=FEEDBACK))
    atomic_write_parquet(feedback, manifest.run_dir.round_feedback(manifest.round),
                         {SPEC_HASH_KEY: spec(manifest, kind_plans, n_shards)})
    track(manifest, feedback)
    return feedback


def track(manifest: Manifest, feedback: pl.DataFrame) -> None:
    """The round's decoded labels to the experiment tracker (run ``<experiment>-decode``, step: the round):
    per kind, each label's count and the positive rate."""
    section = manifest.tracking
    if section.backend == "none" or feedback.is_empty():
        return
    run = TrackedRun(section, section.project or manifest.experiment, run_name(manifest.experiment, "decode"),
                     manifest.run_dir.tracking, manifest.run_dir.tracking / "decode.json")
    tracking = Tracking.start(run, {"experiment": manifest.experiment})
    values = {}
    counts = feedback.group_by("kind").agg(*(pl.col("label").eq(v).sum().alias(name) for name, v in
                                              (("positive", 1), ("neutral", 0), ("negative", -1))),
                                           pl.len().alias("windows"))
    for row in counts.iter_rows(named=True):
        values |= {f"decode/{row['kind']}/{label}": row[label] for label in ("positive", "neutral", "negative")}
        values[f"decode/{row['kind']}/positive_rate"] = row["positive"] / max(row["windows"], 1)
    tracking.log(manifest.round, values)
    tracking.flush()
    tracking.close()


def _precomputed_feedback(manifest: Manifest, kind: str, path: Path) -> pl.DataFrame:
    """The round's windows with the labels of ``path``; windows it has no label for are reported, and left
    out of training."""
    try:
        frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_ndjson(path)
    except Exception as exc:  # a corrupt or unreadable file: name it
        raise MergeError(f"decoder.labels.{kind}: cannot read '{path}' ({exc})") from None
    labels = precomputed_labels(frame, kind, f"decoder.labels.{kind} '{path}'")
    windows = pl.read_parquet(manifest.run_dir.data.turns).filter(decodable()).select(
        "game_turn_id", "round", "policy")
    unlabelled = windows.join(labels, on="game_turn_id", how="anti")
    if unlabelled.height:
        console.print(f"decoder.labels.{kind}: {unlabelled.height} of {windows.height} windows have no label in "
                      f"'{path}' (e.g. {unlabelled['game_turn_id'][0]}); they are not trained on")
    words = {value: word for word, value in LABEL_VALUES.items()}
    return windows.join(labels, on="game_turn_id", how="inner").with_columns(
        kind=pl.lit(kind), decoder_key=pl.lit(f"labels-{file_digest(path)}"), key=pl.col("game_turn_id"),
        label_word=pl.col("label").replace_strict(words, return_dtype=pl.String),
        decoded_in_round=pl.lit(manifest.round, pl.Int64))


STAGE = Stage("merge", upstream=("ingest", "decode"), tasks=lambda m: [Task(KEY, run, (m, m.decoder.shards))],
              done=done, applies=lambda m: not m.seed_round)
