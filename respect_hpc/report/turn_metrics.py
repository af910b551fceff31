"""Turn-level metrics against reference actions (RESPECT.md, "Metrics"), with Polars.

Input: one row per evaluated turn (:data:`TURN_EVAL`): the policy's action a
(selected, deselected image names), the reference action a* (a human listener's
or a post-hoc annotation), where annotated the annotator's verdict on a (``correct``)
and the annotator's satisfaction.

Two similarities are reported, each labelled:
- ``similarity`` (paper eq. 3) pools every pair (i, j) of images that a and a*
  both select, and every pair both deselect, with f(i, j) the cosine similarity
  of the images' embeddings; a side that only one of the two actions has adds -1
  per click of that action on that side; the mean of the pooled terms, null when
  neither action clicks anything or an image has no embedding;
- ``similarity_notebook`` as the official analysis notebook computes ``clicks_sim``
  (analysis/plots.ipynb): the select side alone (the notebook averages the select
  terms twice over and never the deselect terms), null when neither selects.

Exact match compares a with a*, or where the turn carries the annotator's verdict
(the public ``human_eval`` table's ``correctness``) is that verdict, as the notebook.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl

from respect_hpc.report.round_metrics import N_RESAMPLES, bootstrap_mean_ci, group_rng

TURN_EVAL = pl.Schema({
    "game_turn_id": pl.String, "round": pl.Int64, "policy": pl.String,
    "selected": pl.List(pl.String), "deselected": pl.List(pl.String),
    "reference_selected": pl.List(pl.String), "reference_deselected": pl.List(pl.String),
    "feedback": pl.Int8,  # annotator satisfaction 1 / 0 / -1, null where not annotated
    "correct": pl.Boolean,  # the annotator's verdict that a is right (human_eval's correctness), null where none
})

EMBEDDINGS = pl.Schema({"image": pl.String, "embedding": pl.List(pl.Float64)})


def pair_similarities(embeddings: pl.DataFrame) -> pl.DataFrame:
    """Cosine similarity of every pair of embedded images: (image, other, f)."""
    names = embeddings["image"].to_list()
    vectors = np.asarray(embeddings["embedding"].to_list(), dtype=np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = unit @ unit.T
    return pl.DataFrame({"image": np.repeat(names, len(names)), "other": np.tile(names, len(names)),
                         "f": sim.ravel()})


def _side_terms(evals: pl.DataFrame, ours: str, theirs: str, pairs: pl.DataFrame) -> pl.DataFrame:
    """Per turn, the sum and count of one side's terms, and whether an image lacked an embedding."""
    both = evals.filter((pl.col(ours).list.len() > 0) & (pl.col(theirs).list.len() > 0))
    pooled = (both.select("game_turn_id", pl.col(ours).alias("image"), pl.col(theirs).alias("other"))
              .explode("image").explode("other")
              .join(pairs, on=["image", "other"], how="left")
              .group_by("game_turn_id")
              .agg(pl.col("f").sum().alias("total"), pl.len().alias("terms"),
                   pl.col("f").is_null().any().alias("unembedded")))
    one_sided = (evals.filter((pl.col(ours).list.len() > 0) != (pl.col(theirs).list.len() > 0))
                 .select("game_turn_id",
                         clicks=pl.max_horizontal(pl.col(ours).list.len(), pl.col(theirs).list.len()))
                 .select("game_turn_id", total=-pl.col("clicks").cast(pl.Float64),
                         terms=pl.col("clicks").cast(pl.UInt32), unembedded=pl.lit(False)))
    return pl.concat([pooled, one_sided])


def _mean_of_terms(terms: pl.DataFrame, name: str) -> pl.DataFrame:
    return terms.group_by("game_turn_id").agg(
        pl.when(pl.col("unembedded").any()).then(None)
        .otherwise(pl.col("total").sum() / pl.col("terms").sum()).alias(name))


def similarity(evals: pl.DataFrame, embeddings: pl.DataFrame) -> pl.DataFrame:
    """Per turn: Sim(a, a*) of eq. 3 (``similarity``) and as the official notebook (``similarity_notebook``)."""
    pairs = pair_similarities(embeddings)
    selects = _side_terms(evals, "selected", "reference_selected", pairs)
    both = _mean_of_terms(pl.concat([selects, _side_terms(evals, "deselected", "reference_deselected", pairs)]),
                          "similarity")
    return (evals.select("game_turn_id").join(both, on="game_turn_id", how="left")
            .join(_mean_of_terms(selects, "similarity_notebook"), on="game_turn_id", how="left"))


def exact_match() -> pl.Expr:
    """a = a*, or the annotator's verdict where the turn has one."""
    same = ((pl.col("selected").list.sort() == pl.col("reference_selected").list.sort())
            & (pl.col("deselected").list.sort() == pl.col("reference_deselected").list.sort()))
    return pl.coalesce("correct", same)


def missing_embeddings(evals: pl.DataFrame, embeddings: pl.DataFrame) -> list[str]:
    """Images the evaluated actions click that the embedding table lacks."""
    clicked = pl.concat([evals.select(pl.col(c).alias("image")).explode("image") for c in
                         ("selected", "deselected", "reference_selected", "reference_deselected")])
    return sorted(clicked.drop_nulls().unique().join(embeddings.select("image"), on="image", how="anti")["image"])


def _interval(values: pl.Series, seed: int, key: tuple, n_resamples: int) -> tuple[float | None, float | None]:
    values = values.drop_nulls()
    if values.is_empty():
        return None, None
    distinct = values.value_counts().sort(values.name)  # a fixed order for the seeded draws
    return bootstrap_mean_ci(distinct[values.name].cast(pl.Float64).to_numpy(), distinct["count"].to_numpy(),
                             group_rng(seed, *key), n_resamples)


def turn_metrics(evals: pl.DataFrame, embeddings: pl.DataFrame | None = None, *, seed: int = 0,
                 n_resamples: int = N_RESAMPLES) -> pl.DataFrame:
    """Per (policy, round): turns, exact match, similarity (eq. 3 and the notebook's), positive-feedback rate,
    each with its interval. ``evals`` without annotators' verdicts (``correct``) is scored against a* alone."""
    if "correct" not in evals.columns:
        evals = evals.with_columns(correct=pl.lit(None, pl.Boolean))
    scored = evals.with_columns(exact_match=exact_match().cast(pl.Float64),
                                positive=(pl.col("feedback") == 1).cast(pl.Float64))
    if embeddings is not None:
        scored = scored.join(similarity(evals, embeddings), on="game_turn_id", how="left")
    else:
        scored = scored.with_columns(similarity=pl.lit(None, pl.Float64),
                                     similarity_notebook=pl.lit(None, pl.Float64))
    cells = sorted(scored.partition_by("policy", "round", as_dict=True).items())
    names = ("exact_match", "similarity", "similarity_notebook", "positive")
    jobs = [(cell[name], (name, policy, round_)) for (policy, round_), cell in cells for name in names]
    # Intervals run in threads (NumPy releases the GIL); each cell's generator comes from its own key,
    # so the figures do not depend on the order in which threads finish.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        intervals = iter(pool.map(lambda job: _interval(job[0], seed, job[1], n_resamples), jobs))
    rows = []
    for (policy, round_), cell in cells:
        row = {"policy": policy, "round": round_, "turns": cell.height}
        for name in names:
            low, high = next(intervals)
            row |= {name: cell[name].mean(), f"{name}_ci_low": low, f"{name}_ci_high": high}
        rows.append(row)
    columns = ["policy", "round", "turns"] + [f"{n}{s}" for n in names for s in ("", "_ci_low", "_ci_high")]
    schema = {"policy": pl.String, "round": pl.Int64, "turns": pl.Int64} | {c: pl.Float64 for c in columns[3:]}
    return pl.DataFrame(rows, schema=schema).rename({"positive": "positive_feedback_rate",
                                                     "positive_ci_low": "positive_feedback_ci_low",
                                                     "positive_ci_high": "positive_feedback_ci_high"}
                                                    ).sort("policy", "round")
