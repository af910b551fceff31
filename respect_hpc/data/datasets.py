"""Per-variant training sets (RESPECT.md, "Learning objectives"), with Polars.

A variant's examples are the logged turns of its lineage (the policies it names, every round so far),
without idle turns (no utterance or no action), joined with the decoded feedback of the variant's decoder
kind, as the official code builds them (OFFICIAL-RECIPE.md (d), (e)):
- FFT keeps the positive actions (reward 1, weight 1);
- RL keeps positives and negatives, reward 1 / -0.1, weight |reward|; neutral actions are never trained;
- KTO keeps positives (desirable, weight lambda_d) and negatives (undesirable, weight lambda_u).
RL and KTO train every negative (``negatives: all``, the official code) or, each epoch, a fresh draw of about
5 positive : 4 negative (``negatives: per_epoch``, the paper), and need p, the probability the deployed policy
gave each logged action. D_0 (human-human turns whose action was good) joins every round as
rehearsal, trained with label-smoothed cross-entropy whatever the objective, with one synthetic deselection
turn ("Wrong, undo what you selected" -> ``deselect ...``) per 12 of its turns.
"""

from __future__ import annotations

import random

import numpy as np
import polars as pl

from respect_hpc.config.schema import Hyperparameters, Variant
from respect_hpc.core.errors import RespectError
from respect_hpc.data.logs import selection_after
from respect_hpc.domain.multiref import Action, format_action, letters_of

REWARDS = {1: 1.0, 0: 0.0, -1: -0.1}
KTO_REWARDS = {1: 1.0, -1: -1.0}
UNDO_UTTERANCE = "Wrong, undo what you selected"
AUGMENT_EVERY = 12  # the paper's augmentation: one undo turn per 12 D_0 turns
# The official augmentation (OFFICIAL-RECIPE.md (d)): D_0, "remove the last selection", "remove the current
# selection", interleaved with these probabilities, each augmented turn saying one of five utterances.
MIX = (0.88, 0.06, 0.06)
REMOVE_LAST = ("Bad select", "Deselect the last one", "Remove what you just selected",
               "Wrong, undo what you selected", "What you just selected was wrong. Deselect that")
REMOVE_ALL = ("Clear all", "Remove all currently selected", "Deselect everything. Let's start over",
              "Remove everything that you have selected", "No, remove everything.")

EXAMPLE_COLUMNS = ("game_turn_id", "game_id", "turn_id", "source", "round", "policy", "context", "targets", "chats",
                   "previous_actions", "previous_selections", "currently_selected", "selected", "deselected",
                   "action", "prob_action", "label", "reward", "weight")


class DatasetError(RespectError, ValueError):
    """A training set that cannot be built (an empty one, say), with the variant it is for."""


def with_history(turns: pl.DataFrame) -> pl.DataFrame:
    """Add each turn's earlier actions and the selections before each earlier turn (for the policy context)."""
    return turns.sort("game_id", "turn_id").with_columns(
        previous_actions=pl.col("action").implode().over("game_id").list.head(pl.col("turn_id")),
        previous_selections=pl.col("currently_selected").implode().over("game_id").list.head(pl.col("turn_id")),
    )


def negative_draws(examples: pl.DataFrame, hp: Hyperparameters, objective: str, seed: int):
    """With ``negatives: per_epoch`` (RL and KTO): a function of the epoch giving the example rows it trains,
    every row but the logged negatives, and of those a fresh draw of ``negatives_per_5_positives`` per 5
    logged positives (seeded by seed and epoch; all of them when there are fewer). None: every row, every epoch."""
    if hp.negatives != "per_epoch" or objective not in ("rl", "kto"):
        return None
    indexed = examples.with_row_index("_row")
    logged = pl.col("source") == "log"
    negatives = indexed.filter(logged & (pl.col("label") == -1))["_row"].to_list()
    always = set(indexed.filter(~(logged & (pl.col("label") == -1)))["_row"].to_list())
    positives = indexed.filter(logged & (pl.col("label") == 1)).height
    keep = min(len(negatives), int(positives * hp.negatives_per_5_positives / 5))

    def drawn(epoch: int) -> set[int]:
        return always | set(random.Random(f"{seed}/{epoch}/negatives").sample(negatives, keep))

    return drawn


def is_idle() -> pl.Expr:
    """A turn without an utterance or without an action: never trained on, kept as later turns' history."""
    return (pl.col("utterance").str.strip_chars() == "") | (pl.col("action") == "")


def is_good_action() -> pl.Expr:
    """The official simple filter: the action selected something and only targets, or deselected something
    and no target."""
    good_select = ((pl.col("selected").list.len() > 0)
                   & (pl.col("selected").list.set_difference("targets").list.len() == 0))
    good_deselect = ((pl.col("deselected").list.len() > 0)
                     & (pl.col("deselected").list.set_intersection("targets").list.len() == 0))
    return good_select | good_deselect


def logged_examples(turns: pl.DataFrame, feedback: pl.DataFrame, kind: str, objective: str, *,
                    lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0) -> pl.DataFrame:
    """The logged turns a variant trains on, with label, reward and weight (every negative: with
    ``negatives: per_epoch`` each epoch trains a draw of them, :func:`negative_draws`)."""
    labels = feedback.filter(pl.col("kind") == kind).select("game_turn_id", pl.col("label").cast(pl.Int8))
    rewards = KTO_REWARDS if objective == "kto" else REWARDS
    examples = (with_history(turns).filter(~is_idle()).join(labels, on="game_turn_id", how="inner")
                .filter(pl.col("label") == 1 if objective == "fft" else pl.col("label") != 0)
                .with_columns(source=pl.lit("log"),
                              reward=pl.col("label").replace_strict(rewards, return_dtype=pl.Float64)))
    weight = (pl.when(pl.col("label") == 1).then(lambda_desirable).otherwise(lambda_undesirable)
              if objective == "kto" else pl.col("reward").abs())
    return examples.with_columns(weight=weight.cast(pl.Float64))


def _deselection_turns(turns: pl.DataFrame, deselect: pl.Expr, utterances: list[str], suffix: str,
                       state: pl.Expr) -> pl.DataFrame:
    """Copies of ``turns`` one utterance later: the speaker said ``utterances[i]``, the listener deselects
    ``deselect`` (images, evaluated on the source turn); ``state`` (evaluated on the source turn) is the
    selection its state line shows."""
    return turns.with_columns(_deselect=deselect.list.sort(), _state=state).with_columns(
        game_turn_id=pl.col("game_turn_id") + suffix,
        source=pl.lit("augmented"),
        chats=pl.col("chats").list.concat(pl.Series([[u] for u in utterances], dtype=pl.List(pl.String))),
        utterance=pl.Series(utterances, dtype=pl.String),
        previous_actions=pl.concat_list("previous_actions", "action"),
        previous_selections=pl.col("previous_selections").list.concat(pl.col("currently_selected").repeat_by(1)),
        currently_selected=pl.col("_state"),
        deselected=pl.col("_deselect"),
        selected=pl.lit([], pl.List(pl.String)),
        action=pl.Series([format_action(Action(deselect=letters_of(images, context))) for images, context in
                          turns.with_columns(_d=deselect).select("_d", "context").iter_rows()], dtype=pl.String),
        prob_action=pl.lit(None, pl.Float64),
    ).drop("_deselect", "_state")


def interleave(sizes: tuple[int, ...], probabilities: tuple[float, ...], seed: int) -> list[list[int]]:
    """Which rows of each source an interleaving keeps, as Hugging Face datasets' ``interleave_datasets``
    (``stopping_strategy="first_exhausted"``) draws them: sources drawn 1,000 at a time by numpy's
    ``default_rng(seed).choice`` with ``probabilities``, each draw taking its source's next row, stopping at the
    first draw after a source gave its last row."""
    if not sizes[0]:
        return [[] for _ in sizes]
    weights = np.array([p if n else 0.0 for p, n in zip(probabilities, sizes)])  # an empty source is never drawn
    rng = np.random.default_rng(seed)
    taken = [0] * len(sizes)
    while True:
        for k in rng.choice(len(sizes), size=1000, p=weights / weights.sum()):
            taken[k] += 1
            if taken[k] == sizes[k]:
                return [list(range(n)) for n in taken]


def base_turn_id(game_turn_id: pl.Expr) -> pl.Expr:
    """The D_0 turn an augmented turn was made from (its id without the ``_aug...`` suffix)."""
    return game_turn_id.str.replace(r"_aug.*$", "")


def seed_examples(d0_turns: pl.DataFrame, *, seed: int = 42, augmentation: str = "official",
                  include: frozenset[str] | None = None) -> pl.DataFrame:
    """D_0's good turns as rehearsal, with synthetic deselection turns (``augmentation``), drawn with ``seed``
    (``training.d0_augmentation_seed``: every task of a round sees the same D_0):

    - official: D_0 interleaved 0.88 / 0.06 / 0.06 with two augmented copies, "remove the last selection"
      (turns that selected something, not only targets: undo it) and "remove the current selection" (turns
      after which anything is selected: deselect everything), each utterance one of five, then the good
      turns kept; a "remove the last selection" turn's state line shows the selection *before* its source
      turn, as the official augmentation writes it;
    - corrected: the same, with that state line showing the selection after the source turn (what the
      listener saw);
    - paper: one "Wrong, undo what you selected" turn per 12 good turns, made from good turns that selected;
    - none: D_0's good turns alone.

    ``include`` (``data.seed_turns``) keeps only the listed turns, an augmented turn by its source turn's id.
    """
    history = with_history(d0_turns).with_columns(source=pl.lit("d0"), label=pl.lit(1, pl.Int8),
                                                  reward=pl.lit(1.0), weight=pl.lit(1.0)).filter(~is_idle())
    d0 = history.filter(is_good_action())
    rng = random.Random(f"{seed}/augmentation")
    if augmentation == "none":
        examples = d0
    elif augmentation == "paper":
        chosen = d0.filter(pl.col("selected").list.len() > 0)
        chosen = chosen.sample(min(d0.height // AUGMENT_EVERY, chosen.height), seed=seed, shuffle=True)
        undo = _deselection_turns(chosen, pl.col("selected"), [UNDO_UTTERANCE] * chosen.height, "_aug_undo",
                                  selection_after())
        examples = pl.concat([d0, undo.select(d0.columns)])
    else:
        bad_select = history.filter((pl.col("selected").list.len() > 0)
                                    & (pl.col("selected").list.set_difference("targets").list.len() > 0))
        anything = history.filter(selection_after().list.len() > 0)
        kept = interleave((history.height, bad_select.height, anything.height), MIX, seed)
        last_state = pl.col("currently_selected") if augmentation == "official" else selection_after()
        parts = [history[kept[0]].filter(is_good_action())]
        for rows, source, (utterances, suffix, deselect, state) in zip(kept[1:], (bad_select, anything), (
                (REMOVE_LAST, "_aug_remove_last", pl.col("selected"), last_state),
                (REMOVE_ALL, "_aug_remove_current", selection_after(), selection_after()))):
            chosen = source[rows]
            parts.append(_deselection_turns(chosen, deselect, [rng.choice(utterances) for _ in rows], suffix, state))
        examples = pl.concat([p.select(d0.columns) for p in parts])
    if include is not None:
        examples = examples.filter(base_turn_id(pl.col("game_turn_id")).is_in(list(include)))
    return examples


def validation_turns(turns: pl.DataFrame, *, limit: int = 390, seed: int = 42) -> pl.DataFrame:
    """The human-human turns checkpoints are selected on: good actions only, a seeded draw of at most ``limit``."""
    good = with_history(turns).filter(~is_idle() & is_good_action())
    return good.sample(min(limit, good.height), seed=seed, shuffle=True)


def source_counts(examples: pl.DataFrame) -> pl.DataFrame:
    """Examples (positive, negative) per (source, policy, round): where a training set comes from."""
    return (examples.group_by("source", "policy", "round")
            .agg(pl.len().alias("examples"), (pl.col("label") == 1).sum().alias("positive"),
                 (pl.col("label") == -1).sum().alias("negative"))
            .sort("source", "policy", "round"))


def lineage(turns: pl.DataFrame, variant: Variant) -> pl.DataFrame:
    """The logged turns of the policies a variant trains on; refuses a lineage that matches none."""
    if variant.policies is None:
        return turns
    mine = turns.filter(pl.col("policy").is_in(variant.policies))
    if mine.is_empty():
        found = ", ".join(sorted(turns["policy"].unique().to_list())) or "none"
        raise DatasetError(f"variant {variant.name}: its policies ({', '.join(variant.policies)}) match no logged "
                           f"turns; the logs hold: {found}")
    return mine


def training_set(logs: tuple[pl.DataFrame, pl.DataFrame] | None, d0_turns: pl.DataFrame | None, *,
                 variant: Variant, hp: Hyperparameters, augmentation: str = "official", augmentation_seed: int = 42,
                 include: frozenset[str] | None = None) -> pl.DataFrame:
    """The variant's logged examples (``logs``: turns and decoded feedback; None in the seed round) plus D_0
    rehearsal; refuses an empty set, or RL/KTO examples without p, before any GPU time."""
    def rehearsal() -> pl.DataFrame:
        examples = seed_examples(d0_turns, seed=augmentation_seed, augmentation=augmentation, include=include)
        if examples.is_empty():
            raise DatasetError("data.seed_turns: none of the listed turns is a good turn of data.seed_data"
                               if include is not None else "data.seed_data: no good turns to rehearse")
        return examples.select(EXAMPLE_COLUMNS)

    if variant.objective == "seed":
        if d0_turns is None:
            raise DatasetError("the seed round trains on D_0: data.seed_data is required")
        return rehearsal()
    if logs is None:
        raise DatasetError(f"variant {variant.name}: trains on logged turns, and there are none")
    turns, feedback = logs
    kind = variant.feedback
    logged = logged_examples(lineage(turns, variant), feedback, kind, variant.objective,
                             lambda_desirable=hp.lambda_desirable, lambda_undesirable=hp.lambda_undesirable)
    if logged.filter(pl.col("label") == 1).is_empty():
        raise DatasetError(f"variant {variant.name}: no positive {kind} feedback in the logs: nothing to train on")
    unlogged = logged.filter(pl.col("prob_action").is_null())
    if variant.objective in ("rl", "kto") and unlogged.height:
        raise DatasetError(f"variant {variant.name}: {unlogged.height} logged turns have no p (prob_action), e.g. "
                           f"{unlogged['game_turn_id'][0]} of policy {unlogged['policy'][0]}: {variant.objective} "
                           "weighs each action by the probability the deployed policy gave it")
    parts = [logged.select(EXAMPLE_COLUMNS)]
    if d0_turns is not None:
        parts.append(rehearsal())
    return pl.concat(parts, how="vertical_relaxed")
