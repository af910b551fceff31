"""Per-variant training sets (RESPECT.md, "Learning objectives"), with Polars.

A variant's examples are the logged turns of every round so far joined with the
decoded feedback of the variant's decoder kind:
- FFT keeps the positive actions;
- RL keeps all, with reward 1 / 0 / -0.1 for positive / neutral / negative;
- KTO keeps positives (desirable) and negatives (undesirable), neutral dropped.
RL and KTO subsample negatives to about 5 positive : 4 negative (seeded), and
weight each example by |reward|. D_0 (successful human-human turns) joins every
round as positive rehearsal, with one synthetic deselection turn ("Wrong, undo
what you selected" -> ``deselect ...``) per 12 of its turns.
"""

from __future__ import annotations

import polars as pl

from respect_hpc.ingest import selection_after
from respect_hpc.multiref import Action, format_action, letters_of

REWARDS = {1: 1.0, 0: 0.0, -1: -0.1}
UNDO_UTTERANCE = "Wrong, undo what you selected"
AUGMENT_EVERY = 12

EXAMPLE_COLUMNS = ("game_turn_id", "source", "round", "policy", "context", "targets", "chats",
                   "previous_actions", "previous_selections", "currently_selected", "selected", "deselected",
                   "action", "prob_action", "label", "reward", "weight")


class DatasetError(ValueError):
    """A training set that cannot be built (an empty one, say), with the variant it is for."""


def with_history(turns: pl.DataFrame) -> pl.DataFrame:
    """Add each turn's earlier actions and the selections before each earlier turn (for the policy context)."""
    return turns.sort("game_id", "turn_id").with_columns(
        previous_actions=pl.col("action").implode().over("game_id").list.head(pl.col("turn_id")),
        previous_selections=pl.col("currently_selected").implode().over("game_id").list.head(pl.col("turn_id")),
    )


def _subsample_negatives(examples: pl.DataFrame, negatives_per_5_positives: float, seed: int) -> pl.DataFrame:
    positives = examples.filter(pl.col("label") == 1)
    negatives = examples.filter(pl.col("label") == -1)
    keep = min(negatives.height, int(positives.height * negatives_per_5_positives / 5))
    return pl.concat([examples.filter(pl.col("label") != -1),
                      negatives.sample(keep, seed=seed, shuffle=False)]).sort("game_turn_id")


def logged_examples(turns: pl.DataFrame, feedback: pl.DataFrame, kind: str, objective: str, *, seed: int,
                    negatives_per_5_positives: float = 4.0) -> pl.DataFrame:
    """The logged turns a variant trains on, with label, reward and weight."""
    labels = feedback.filter(pl.col("kind") == kind).select("game_turn_id", pl.col("label").cast(pl.Int8))
    examples = (with_history(turns).join(labels, on="game_turn_id", how="inner")
                .with_columns(source=pl.lit("log"),
                              reward=pl.col("label").replace_strict(REWARDS, return_dtype=pl.Float64)))
    if objective == "fft":
        examples = examples.filter(pl.col("label") == 1)
    elif objective == "kto":
        examples = examples.filter(pl.col("label") != 0)
    if objective in ("rl", "kto"):
        examples = _subsample_negatives(examples, negatives_per_5_positives, seed)
    return examples.with_columns(weight=pl.col("reward").abs())


def seed_examples(d0_turns: pl.DataFrame, *, seed: int) -> pl.DataFrame:
    """D_0 as positive rehearsal, plus one synthetic deselection turn per 12 of its turns."""
    d0 = with_history(d0_turns).with_columns(source=pl.lit("d0"), label=pl.lit(1, pl.Int8), reward=pl.lit(1.0),
                                             weight=pl.lit(1.0))
    count = d0.height // AUGMENT_EVERY
    candidates = d0.filter(pl.col("selected").list.len() > 0)
    if count > candidates.height:
        raise DatasetError(f"D_0: {count} deselection turns needed, only {candidates.height} turns select anything")
    chosen = candidates.sample(count, seed=seed, shuffle=True)
    undo_actions = [format_action(Action(deselect=letters_of(sel, ctx)))
                    for sel, ctx in chosen.select("selected", "context").iter_rows()]
    augmented = chosen.with_columns(
        game_turn_id=pl.col("game_turn_id") + "_undo",
        source=pl.lit("augmented"),
        chats=pl.col("chats").list.concat(pl.lit([UNDO_UTTERANCE])),
        previous_actions=pl.concat_list("previous_actions", "action"),
        previous_selections=pl.col("previous_selections").list.concat(pl.col("currently_selected").repeat_by(1)),
        currently_selected=selection_after(),
        deselected=pl.col("selected"),
        selected=pl.lit([], pl.List(pl.String)),
        action=pl.Series(undo_actions, dtype=pl.String),
        prob_action=pl.lit(None, pl.Float64),
    )
    return pl.concat([d0, augmented.select(d0.columns)])


def training_set(turns: pl.DataFrame, feedback: pl.DataFrame, d0_turns: pl.DataFrame | None, *, variant: str,
                 kind: str, objective: str, seed: int, negatives_per_5_positives: float = 4.0) -> pl.DataFrame:
    """Logged examples of every round so far plus D_0 rehearsal; refuses an empty set before any GPU time."""
    logged = logged_examples(turns, feedback, kind, objective, seed=seed,
                             negatives_per_5_positives=negatives_per_5_positives)
    if logged.filter(pl.col("label") == 1).is_empty():
        raise DatasetError(f"variant {variant}: no positive {kind} feedback in the logs: nothing to train on")
    parts = [logged]
    if d0_turns is not None:
        parts.append(seed_examples(d0_turns, seed=seed))
    return pl.concat([p.select(EXAMPLE_COLUMNS) for p in parts], how="vertical_relaxed")
