"""The deploy stage: a round's selected policies (and the control) play simulated games, logged in the public
interaction layout (manifest ``simulation``; the speaker is simulator.py).

One array task per shard of games (game i is in shard i % shards); every deployed policy plays every game of
the shard (the seed policy, in round 0 and as the control, those of its own ``control_games``),
``simulation.batch`` games at a time, turn by turn: the official policy prompt in the game's listener order,
an action generated as generation.py does (legal tokens, temperature 1, grammar-constrained by default), p the
probability the policy gave that action as it sampled; an illegal action does nothing. Game i starts from the
same images, targets and speaker seed for every policy. A shard's games are written atomically to
``round-R/deploy/part-SSSSS-of-NNNNN.parquet`` with the hash of their spec (a rerun skips current parts); the
collect stage writes ``round-R/deployed.parquet``, what the next round ingests, and
``round-R/deployed_truth.parquet``, the simulator's truth of each turn (1 good, -1 bad, 0 nothing done).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import polars as pl
import torch
from rich.console import Console

from respect_hpc.model.generation import GameState, generate_actions, legal_token_ids
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.domain.policies import CONTROL_POLICY, SEED_POLICY
from respect_hpc.config.schema import Manifest
from respect_hpc.model.loading import load_policy, load_processor, load_tokenizer, model_fingerprint
from respect_hpc.domain.multiref import Action, ActionError, format_action, letters_of, parse_action
from respect_hpc.model.policy_inputs import PolicyEncoder, policy_view
from respect_hpc.domain.prompts import policy_template
from respect_hpc.core.rundir import RunDir
from respect_hpc.domain.simulator import SimulatedGame, action_images, description_pool, interaction_row
from respect_hpc.domain.synthetic import load_image_bank
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata

console = Console(stderr=True)
DEPLOY_FOLDER = "deploy"
DEPLOYED_FILE = "deployed.parquet"
TRUTH_FILE = "deployed_truth.parquet"


class DeployError(RuntimeError):
    """A deployment that cannot run (a policy not selected yet, a missing part), with what to do."""


def deployed_policies(manifest: Manifest) -> dict[str, Path]:
    """Policy name -> adapter: each variant's selected policy of this round, and the control."""
    run = RunDir.of(manifest)
    policies = {v.name: run.policy(manifest.round, v.name) for v in manifest.variants}
    if manifest.simulation.control and not manifest.seed_round:
        policies[CONTROL_POLICY] = run.policy(0, SEED_POLICY)
    return policies


def games_played(manifest: Manifest, policy: str) -> int:
    """Games ``policy`` plays: the seed policy (round 0's deployment, then the control every round)
    ``control_games``, the round's selected policies ``games``."""
    sim = manifest.simulation
    seed_policy = policy == CONTROL_POLICY or (manifest.seed_round and policy == SEED_POLICY)
    return (sim.control_games or sim.games) if seed_policy else sim.games


def part_path(manifest: Manifest, shard: int, n_shards: int) -> Path:
    return RunDir.of(manifest).round(manifest.round) / DEPLOY_FOLDER / f"part-{shard:05d}-of-{n_shards:05d}.parquet"


def shard_spec(manifest: Manifest, shard: int, n_shards: int) -> str:
    run = RunDir.of(manifest)
    return spec_hash({
        "simulation": manifest.simulation.model_dump(mode="json", exclude={"shards", "batch"}),
        "shard": shard, "of": n_shards, "round": manifest.round, "policy_template": manifest.policy_template,
        "model": model_fingerprint(manifest.model, run.root / "cache" / "fingerprints.json"),
        "model_options": manifest.model.model_dump(mode="json", include={"dtype", "image_size", "image_splitting"}),
        "policies": {name: file_digest(path) for name, path in deployed_policies(manifest).items()},
        "descriptions": file_digest(manifest.simulation.kilogram / "dense.json")})


def _current(path: Path, spec: str) -> bool:
    return parquet_metadata(path).get(SPEC_HASH_KEY) == spec


def done_shards(manifest: Manifest, n_shards: int) -> set[int]:
    """Shards whose part is current (none before every deployed policy was selected)."""
    if not all((p / "adapter_config.json").is_file() for p in deployed_policies(manifest).values()):
        return set()
    return {s for s in range(n_shards)
            if _current(part_path(manifest, s, n_shards), shard_spec(manifest, s, n_shards))}


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


def play(model, encoder: PolicyEncoder, template, games: list[SimulatedGame], *, constrained: bool) -> list[dict]:
    """Play ``games`` to their end with the policy, all at once turn by turn; per game, the selection after
    each turn (sorted images) and p of each action."""
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
            states.append(GameState(10, frozenset(letters_of(game.selection, game.context))))
        legal = legal or legal_token_ids(encoder, views[0])
        for i, generated in zip(live, generate_actions(model, encoder, views, states, legal=legal,
                                                       constrained=constrained)):
            game, record = games[i], records[i]
            try:
                action = parse_action(generated.text.strip(), 10)
            except ActionError:
                action = Action()
            record["before"].append(sorted(game.selection))
            game.act(*action_images(action, game.context))
            record["actions"].append(format_action(action) if not action.is_empty else "")
            record["clicks"].append(sorted(game.selection))
            record["probs"].append(generated.probability)
    return records


def run_shard(manifest: Manifest, shard: int, n_shards: int) -> dict[str, int]:
    """Play shard ``shard`` of ``n_shards`` with every deployed policy; returns games played per policy."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"--shard {shard}: expected 0 to {n_shards - 1}")
    sim, path = manifest.simulation, part_path(manifest, shard, n_shards)
    policies = deployed_policies(manifest)
    for name, adapter in policies.items():
        if not (adapter / "adapter_config.json").is_file():
            raise DeployError(f"policy {name}: no selected adapter in '{adapter}'; run the select stage first")
    spec = shard_spec(manifest, shard, n_shards)
    if _current(path, spec):
        console.print(f"{path} is current, skipped")
        return {}
    descriptions = _descriptions(manifest)
    settings = sim.speaker_settings()
    processor = load_processor(manifest.model)
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(manifest.model)
    encoder = PolicyEncoder(processor, tokenizer, manifest.data.images, processor is not None)
    template = policy_template(manifest.policy_template)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, played = [], {}
    for name, adapter in policies.items():
        numbers = list(range(shard, games_played(manifest, name), n_shards))
        model = load_policy(manifest.model, adapter=adapter).to(device).eval()
        torch.manual_seed(int(hashlib.blake2b(f"{sim.seed}/{manifest.round}/{shard}/{name}".encode(),
                                              digest_size=4).hexdigest(), 16))
        for start in range(0, len(numbers), sim.batch):
            chunk = numbers[start:start + sim.batch]
            games = [SimulatedGame.new(random.Random(f"{sim.seed}/{manifest.round}/{i}"), descriptions, settings)
                     for i in chunk]
            with torch.no_grad():
                records = play(model, encoder, template, games, constrained=sim.constrained)
            for i, game, record in zip(chunk, games, records):
                game_id = f"sim-r{manifest.round}-{name}-{sim.seed}-{i:06d}"
                rows.append(interaction_row(game, game_id, name, manifest.round, record["clicks"], record["probs"]))
            console.print(f"{name}: {min(start + sim.batch, len(numbers))}/{len(numbers)} games of shard {shard}")
        played[name] = len(numbers)
        del model
    frame = pl.DataFrame(rows, schema_overrides={"prob_action": pl.List(pl.Float64), "truth": pl.List(pl.Int8)})
    atomic_write_parquet(frame, path, {SPEC_HASH_KEY: spec})
    return played


def collected_spec(manifest: Manifest, n_shards: int) -> str:
    return spec_hash({"parts": [shard_spec(manifest, s, n_shards) for s in range(n_shards)]})


def is_collected(manifest: Manifest, n_shards: int) -> bool:
    if len(done_shards(manifest, n_shards)) < n_shards:
        return False
    folder = RunDir.of(manifest).round(manifest.round)
    return (_current(folder / DEPLOYED_FILE, collected_spec(manifest, n_shards))
            and _current(folder / TRUTH_FILE, collected_spec(manifest, n_shards)))


def truth_table(games: pl.DataFrame) -> pl.DataFrame:
    """(game_id, turn_id, truth) of simulated games with the simulator's ``truth`` list."""
    return (games.select("game_id", "truth").with_columns(turn_id=pl.int_ranges(pl.col("truth").list.len()))
            .explode("truth", "turn_id").select("game_id", "turn_id", "truth"))


def collect(manifest: Manifest, n_shards: int) -> pl.DataFrame:
    """Check every part and write round-R/deployed.parquet and round-R/deployed_truth.parquet."""
    parts = []
    for shard in range(n_shards):
        path = part_path(manifest, shard, n_shards)
        if not _current(path, shard_spec(manifest, shard, n_shards)):
            raise DeployError(f"{path}: missing or out of date; run the deploy stage's shard {shard} again")
        parts.append(pl.read_parquet(path))
    games = pl.concat(parts).sort("policy_name", "game_id")
    folder = RunDir.of(manifest).round(manifest.round)
    truth = truth_table(games)
    stamp = {SPEC_HASH_KEY: collected_spec(manifest, n_shards)}
    atomic_write_parquet(truth, folder / TRUTH_FILE, stamp)
    atomic_write_parquet(games.drop("truth"), folder / DEPLOYED_FILE, stamp)
    return games
