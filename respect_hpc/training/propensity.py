"""What the deployed (collecting) policies gave the logged actions. p where the logs lack it (``data.propensity: recompute``), as the official annotation computes it: a
teacher-forced pass of the policy that was deployed (the base model with that policy's adapter, named in
``data.deployed``) over the training-format prompt in the listener's own image order; p is the product of
the answer tokens' probabilities (full vocabulary, temperature 1, no suppression). Logged p is kept. And
the adapters that logged a KTO variant's examples, its reference point's policies, found before any
training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl
import torch

from respect_hpc.config.schema import DataSection, ModelSection, Variant
from respect_hpc.data.datasets import is_idle, lineage, with_history
from respect_hpc.data.logs import IngestError
from respect_hpc.domain.prompts import policy_template
from respect_hpc.model.loading import load_encoder, load_policy
from respect_hpc.model.policy_inputs import answer_logits, policy_view
from respect_hpc.training.objectives import score_actions

BATCH = 8


def unlogged(turns: pl.DataFrame) -> pl.DataFrame:
    """The actions whose p the logs do not give (idle turns have none to give)."""
    return turns.filter(pl.col("prob_action").is_null() & (pl.col("action") != ""))


def check_deployed(data: DataSection, turns: pl.DataFrame, variants: list[Variant] = ()) -> None:
    """Refuses, before any model is loaded, logs without p that the manifest cannot recompute it for, or that
    an RL or KTO variant of ``variants`` would train on with p as logged."""
    missing = unlogged(turns)
    if missing.is_empty():
        return
    if data.propensity != "recompute":
        for variant in variants:
            trained = missing.filter("has_follow_up")
            lacking = trained if variant.policies is None else trained.filter(pl.col("policy").is_in(variant.policies))
            if variant.objective in ("rl", "kto") and lacking.height:
                raise IngestError(f"data.propensity: {lacking.height} actions that variant {variant.name} "
                                  f"({variant.objective}) trains on have no p (e.g. {lacking['game_turn_id'][0]} of "
                                  f"policy {lacking['policy'][0]}): set data.propensity: recompute, with "
                                  "data.deployed naming each policy's adapter")
        return
    lacking = sorted(set(missing["policy"]) - set(data.deployed))
    if lacking:
        example = missing.filter(pl.col("policy") == lacking[0])["game_turn_id"][0]
        raise IngestError(f"data.deployed: no adapter for policy {', '.join(lacking)}, whose logged turns have no p "
                          f"(prob_action) to recompute (e.g. {example})")


def collecting_adapters(variant: Variant, turns: pl.DataFrame,
                        adapter_of: Callable[[str, int], Path]) -> dict[tuple[str, int], Path] | None:
    """KTO's reference policies: per (policy, round) of the variant's logged ``turns``, the adapter that logged
    them (``adapter_of(policy, round)``, Manifest.collecting_adapter); refuses one that is not there, naming the
    policy and round. None for a variant of another objective."""
    if variant.objective != "kto":
        return None
    found = {}
    for policy, round_ in (lineage(turns.filter(~is_idle()), variant).select("policy", "round").unique()
                           .sort("policy", "round").iter_rows()):
        adapter = adapter_of(policy, round_)
        if not (adapter / "adapter_config.json").is_file():
            raise IngestError(f"variant {variant.name}: KTO's reference point scores each logged example under the "
                              f"policy that logged it; policy {policy} of round {round_} has no adapter at "
                              f"'{adapter}' (name it in data.deployed)")
        found[(policy, round_)] = adapter
    return found


@torch.no_grad()
def recompute(data: DataSection, model_spec: ModelSection, template_key: str, turns: pl.DataFrame,
              progress=print) -> pl.DataFrame:
    """``turns`` with p filled in for every action the logs give none (``data.propensity: recompute``), under
    the adapters of ``data.deployed`` on the base model ``model_spec``, prompts in ``template_key``."""
    missing = unlogged(turns)
    if data.propensity != "recompute" or missing.is_empty():
        return turns
    check_deployed(data, turns)
    template = policy_template(template_key)
    encoder = load_encoder(model_spec, data.images)
    history = with_history(turns).join(missing.select("game_turn_id"), on="game_turn_id", how="semi")
    found = []
    for policy, rows in history.group_by("policy", maintain_order=True):
        adapter = data.deployed[policy[0]]
        model = load_policy(model_spec, adapter=adapter).eval()
        rows = rows.to_dicts()
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            batch = encoder.collate([encoder.encode(policy_view(row, template)) for row in chunk])
            scores = score_actions(answer_logits(model, batch), batch["targets"], batch["target_mask"])
            found += [(row["game_turn_id"], p) for row, p in zip(chunk, scores.logprob.exp().tolist())]
        progress(f"p recomputed for {len(rows)} actions of policy {policy[0]} under {adapter}")
        del model
    recomputed = pl.DataFrame(found, schema={"game_turn_id": pl.String, "_p": pl.Float64}, orient="row")
    return (turns.join(recomputed, on="game_turn_id", how="left")
            .with_columns(prob_action=pl.coalesce("prob_action", "_p")).drop("_p"))
