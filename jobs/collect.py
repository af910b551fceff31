"""Collect stage: the deploy stage's parts -> round-R/deployed.parquet, what the next round ingests, and
round-R/deployed_truth.parquet, the simulator's truth of each turn (1 good, -1 bad, 0 nothing done).

The deploy stage decides whether its parts are current; a stage whose upstream has work is never done
(registry.py), so collect runs after every part is made again. It records the hashes the parts carry.
"""

from __future__ import annotations

import polars as pl

from jobs.registry import Stage, Task
from respect_hpc.config.schema import Manifest
from respect_hpc.core.errors import RespectError
from respect_hpc.core.hashing import spec_hash
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata

KEY = "collect"


class CollectError(RespectError, RuntimeError):
    """A deployment part that is missing or unreadable."""


def spec(manifest: Manifest, n_shards: int) -> str | None:
    """The hash of the parts' own spec hashes (None while a part is missing or unreadable)."""
    run = manifest.run_dir
    hashes = [parquet_metadata(run.deploy_part(manifest.round, s, n_shards)).get(SPEC_HASH_KEY)
              for s in range(n_shards)]
    return None if None in hashes else spec_hash({"parts": hashes})


def done(manifest: Manifest) -> set[str]:
    run, current = manifest.run_dir, spec(manifest, manifest.simulation.shards)
    written = [parquet_metadata(p).get(SPEC_HASH_KEY) for p in (run.deployed(manifest.round),
                                                                 run.deployed_truth(manifest.round))]
    return {KEY} if current is not None and written == [current, current] else set()


def truth_table(games: pl.DataFrame) -> pl.DataFrame:
    """(game_id, turn_id, truth) of simulated games with the simulator's ``truth`` list."""
    return (games.select("game_id", "truth").with_columns(turn_id=pl.int_ranges(pl.col("truth").list.len()))
            .explode("truth", "turn_id").select("game_id", "turn_id", "truth"))


def run(manifest: Manifest, n_shards: int) -> pl.DataFrame:
    """Gather every part into round-R/deployed.parquet and round-R/deployed_truth.parquet."""
    run_dir = manifest.run_dir
    stamp = spec(manifest, n_shards)
    if stamp is None:
        missing = next(s for s in range(n_shards)
                       if not parquet_metadata(run_dir.deploy_part(manifest.round, s, n_shards)))
        raise CollectError(f"{run_dir.deploy_part(manifest.round, missing, n_shards)}: missing or unreadable; run "
                           f"the deploy stage's shard {missing} again")
    games = pl.concat([pl.read_parquet(run_dir.deploy_part(manifest.round, s, n_shards))
                       for s in range(n_shards)]).sort("policy_name", "game_id")
    atomic_write_parquet(truth_table(games), run_dir.deployed_truth(manifest.round), {SPEC_HASH_KEY: stamp})
    atomic_write_parquet(games.drop("truth"), run_dir.deployed(manifest.round), {SPEC_HASH_KEY: stamp})
    return games


STAGE = Stage("collect", upstream=("deploy",), tasks=lambda m: [Task(KEY, run, (m, m.simulation.shards))],
              done=done, applies=lambda m: m.simulation is not None)
