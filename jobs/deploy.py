"""The deploy stage: a round's selected policies (and the control) play simulated games, logged in the public
interaction layout (manifest ``simulation``; the speaker is domain/simulator.py).

One array task per shard of games (game i is in shard i % shards); every deployed policy plays every game of
the shard (the seed policy, in round 0 and as the control, those of its own ``control_games``),
``simulation.batch`` games at a time, turn by turn: the official policy prompt in the game's listener order,
an action generated as generation.py does, as ``simulation.decoding`` says: official (the bots of the official
code: legal tokens at temperature 1, the state-agnostic regex for KTO variants, an unparseable or empty action
clicks the first image, p under the full vocabulary) or constrained (legal actions of each state for every
policy, p over the allowed tokens, an illegal action does nothing). Game i starts from the
same images, targets and speaker seed for every policy. A shard's games are written atomically to
``round-R/deploy/part-SSSSS-of-NNNNN.parquet`` with the hash of their spec (a rerun skips current parts); the
collect stage gathers them into the round's deployed games.
"""

from __future__ import annotations

import hashlib
import random

import polars as pl
import torch

from jobs.registry import Stage, Task, check_shard, shard_key
from respect_hpc.config.schema import Manifest
from respect_hpc.core.errors import RespectError
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata
from respect_hpc.core.text import log_console
from respect_hpc.domain.multiref import Action, ActionError, format_action, letters_of, parse_action
from respect_hpc.domain.prompts import policy_template
from respect_hpc.domain.simulator import (
    SimulatedGame,
    action_images,
    deployed_game_id,
    description_pool,
    interaction_row,
)
from respect_hpc.domain.synthetic import load_image_bank
from respect_hpc.model.generation import GameState, generate_actions, legal_token_ids
from respect_hpc.model.loading import load_encoder, load_policy, model_fingerprint
from respect_hpc.model.policy_inputs import PolicyEncoder, PolicyView, answer_logits, policy_view
from respect_hpc.training.objectives import score_actions

console = log_console()


class DeployError(RespectError, RuntimeError):
    """A deployment that cannot run (a policy not selected yet, a missing part), with what to do."""


def shard_spec(manifest: Manifest, shard: int, n_shards: int) -> str:
    run = manifest.run_dir
    return spec_hash({
        "simulation": manifest.simulation.model_dump(mode="json", exclude={"shards", "batch"}),
        "shard": shard, "of": n_shards, "round": manifest.round, "policy_template": manifest.policy_template,
        "model": model_fingerprint(manifest.model, run.fingerprint_memo),
        "model_options": manifest.model.model_dump(mode="json", include={"dtype", "image_size", "image_splitting"}),
        "policies": {name: file_digest(path) for name, path in manifest.deployed_policies().items()},
        "descriptions": file_digest(manifest.simulation.kilogram / "dense.json"),
        "images": file_digest(manifest.data.images)})


def current(manifest: Manifest, shard: int, n_shards: int) -> bool:
    path = manifest.run_dir.deploy_part(manifest.round, shard, n_shards)
    return parquet_metadata(path).get(SPEC_HASH_KEY) == shard_spec(manifest, shard, n_shards)


def done(manifest: Manifest) -> set[str]:
    """Shards whose part is current (none before every deployed policy was selected)."""
    n = manifest.simulation.shards
    if not all((p / "adapter_config.json").is_file() for p in manifest.deployed_policies().values()):
        return set()
    return {shard_key(s, n) for s in range(n) if current(manifest, s, n)}


def _descriptions(manifest: Manifest) -> dict[str, list[str]]:
    sim = manifest.simulation
    bank = load_image_bank(sim.kilogram, dense="dense.json")
    if bank.source != "kilogram":
        raise DeployError(f"simulation.kilogram: no dense.json in '{sim.kilogram}'")
    missing = [name for name in bank.names if not (manifest.data.images / name).is_file()]
    if missing:
        raise DeployError(f"data.images: '{manifest.data.images}' lacks {len(missing)} KiloGram tangrams, e.g. "
                          f"{missing[0]} (name the KiloGram tangram_pngs folder)")
    return description_pool(bank.descriptions, sim.pool, sim.tangrams, sim.descriptions)


def play(model, encoder: PolicyEncoder, template, games: list[SimulatedGame], *, decoding: str,
         objective: str) -> list[dict]:
    """Play ``games`` to their end with the policy (trained with ``objective``), all at once turn by turn, with
    ``decoding`` (simulation.decoding); per game, the selection after each turn (sorted images) and p of
    each action."""
    official = decoding == "official"
    records = [{"clicks": [], "probs": [], "actions": [], "before": []} for _ in games]
    legal = None  # the action tokens, found at the first turn
    while live := [i for i, g in enumerate(games) if not g.over]:
        views, states = [], []
        for i in live:
            game, record = games[i], records[i]
            row = {"context": game.context, "chats": list(game.chat), "previous_actions": record["actions"],
                   "previous_selections": record["before"], "currently_selected": sorted(game.selection),
                   "action": ""}
            views.append(policy_view(row, template))
            states.append(GameState(10, None if official else frozenset(letters_of(game.selection, game.context))))
        legal = legal or legal_token_ids(encoder, views[0])
        generated_all = generate_actions(model, encoder, views, states, legal=legal, full_vocabulary=official,
                                         constrained=objective == "kto" or not official)
        fallbacks = []
        for k, (i, generated) in enumerate(zip(live, generated_all)):
            game, record = games[i], records[i]
            try:
                action = parse_action(generated.text.strip(), 10)
            except ActionError:
                action = Action()
            p = generated.probability
            if official:
                action = executable(action, letters_of(game.selection, game.context))
                if action is None:  # the official bot clicks the first image
                    first = frozenset("A")
                    action = Action(deselect=first) if "A" in letters_of(game.selection, game.context) \
                        else Action(select=first)
                    fallbacks.append((k, len(record["probs"])))
            record["before"].append(sorted(game.selection))
            game.act(*action_images(action, game.context))
            record["actions"].append(format_action(action) if not action.is_empty else "")
            record["clicks"].append(sorted(game.selection))
            record["probs"].append(p)
        clicked = action_probabilities(model, encoder, [views[k] for k, _ in fallbacks],
                                       [records[live[k]]["actions"][turn] for k, turn in fallbacks])
        for (k, turn), p in zip(fallbacks, clicked):
            records[live[k]]["probs"][turn] = p
    return records


def executable(action: Action, selected: list[str]) -> Action | None:
    """What the official bot does with a parsed action: its selections and deselections as clicks that toggle
    images (a state-agnostic action may deselect an unselected image: that click selects it); None when it
    clicks nothing (the bot then clicks the first image)."""
    clicks = action.select | action.deselect
    if not clicks:
        return None
    return Action(deselect=frozenset(x for x in clicks if x in selected),
                  select=frozenset(x for x in clicks if x not in selected))


@torch.no_grad()
def action_probabilities(model, encoder: PolicyEncoder, views: list[PolicyView], actions: list[str]) -> list[float]:
    """p of each action under the policy by a teacher-forced pass over its prompt (full vocabulary, temperature
    1), as the official annotation recomputes p."""
    if not views:
        return []
    batch = encoder.collate([encoder.encode(PolicyView(v.messages, v.images, a)) for v, a in zip(views, actions)])
    batch = {k: t.to(next(model.parameters()).device) for k, t in batch.items()}
    return score_actions(answer_logits(model, batch), batch["targets"], batch["target_mask"]).logprob.exp().tolist()


def run(manifest: Manifest, shard: int, n_shards: int) -> dict[str, int]:
    """Play shard ``shard`` of ``n_shards`` with every deployed policy; returns games played per policy."""
    check_shard(shard, n_shards)
    sim, path = manifest.simulation, manifest.run_dir.deploy_part(manifest.round, shard, n_shards)
    policies = manifest.deployed_policies()
    for name, adapter in policies.items():
        if not (adapter / "adapter_config.json").is_file():
            raise DeployError(f"policy {name}: no selected adapter in '{adapter}'; run the select stage first")
    if current(manifest, shard, n_shards):
        console.print(f"{path} is current, skipped")
        return {}
    spec = shard_spec(manifest, shard, n_shards)
    descriptions = _descriptions(manifest)
    settings = sim.speaker_settings()
    encoder = load_encoder(manifest.model, manifest.data.images)
    template = policy_template(manifest.policy_template)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(manifest.cluster.stages["deploy"].cpus)  # the task's cores, not the node's
    rows, played = [], {}
    for name, adapter in policies.items():
        numbers = list(range(shard, manifest.games_played(name), n_shards))
        model = load_policy(manifest.model, adapter=adapter).to(device).eval()
        torch.manual_seed(int(hashlib.blake2b(f"{sim.seed}/{manifest.round}/{shard}/{name}".encode(),
                                              digest_size=4).hexdigest(), 16))
        for start in range(0, len(numbers), sim.batch):
            chunk = numbers[start:start + sim.batch]
            games = [SimulatedGame.new(random.Random(f"{sim.seed}/{manifest.round}/{i}"), descriptions, settings)
                     for i in chunk]
            with torch.no_grad():
                records = play(model, encoder, template, games, decoding=sim.decoding,
                               objective=_objective(manifest, name))
            for i, game, record in zip(chunk, games, records):
                game_id = deployed_game_id(manifest.round, name, sim.seed, i)
                rows.append(interaction_row(game, game_id, name, manifest.round, record["clicks"], record["probs"]))
            console.print(f"{name}: {min(start + sim.batch, len(numbers))}/{len(numbers)} games of shard {shard}")
        played[name] = len(numbers)
        del model
    frame = pl.DataFrame(rows, schema_overrides={"prob_action": pl.List(pl.Float64), "truth": pl.List(pl.Int8)})
    atomic_write_parquet(frame, path, {SPEC_HASH_KEY: spec})
    return played




def _objective(manifest: Manifest, policy: str) -> str:
    """How a deployed policy was trained: its variant's objective; the seed policy (and the control) FFT-like."""
    variant = manifest.variant(policy)
    return variant.objective if variant is not None else "seed"


def tasks(manifest: Manifest) -> list[Task]:
    n = manifest.simulation.shards
    return [Task(shard_key(s, n), run, (manifest, s, n)) for s in range(n)]


STAGE = Stage("deploy", upstream=("select",), tasks=tasks, done=done, applies=lambda m: m.simulation is not None)
