"""Ingest stage: the logs of every earlier round -> data/{interactions,turns,quarantine}.parquet.

Bad rows go to quarantine (never dropped silently); p is recomputed where the logs lack it and the manifest
asks (``data.propensity: recompute``, training/propensity.py). A KTO variant whose logged examples' collecting
adapters are missing is refused here, before decoding.
"""

from __future__ import annotations

from jobs.registry import Stage, Task
from respect_hpc.config.schema import Manifest
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.core.io import SPEC_HASH_KEY, parquet_metadata
from respect_hpc.data.logs import ingest, write_tables
from respect_hpc.domain.policies import CONTROL_POLICY, PUBLIC_POLICIES
from respect_hpc.model.loading import model_fingerprint
from respect_hpc.training.propensity import check_deployed, collecting_adapters, recompute

KEY = "ingest"


def options(manifest: Manifest) -> dict:
    """The reading options of the round's logs: the public policy names, and every name the manifest gives a
    policy (variants, their lineages, the simulated deployment's control), are accepted."""
    named = {*(v.name for v in manifest.variants), *(p for v in manifest.variants for p in v.policies or ())}
    if manifest.simulation is not None:
        named.add(CONTROL_POLICY)
    return {"quarantine": True, "max_turns": manifest.data.max_turns, "max_round": manifest.round - 1,
            "policies": sorted({*PUBLIC_POLICIES, *named})}


def spec(manifest: Manifest) -> str:
    recomputed = manifest.data.propensity == "recompute"  # p then depends on the deployed policies too
    return spec_hash({"sources": [file_digest(p) for p in manifest.data.interactions], **options(manifest),
                      "deployed": {k: file_digest(v) for k, v in sorted(manifest.data.deployed.items())}
                      if recomputed else None,
                      "model": model_fingerprint(manifest.model, manifest.run_dir.fingerprint_memo)
                      if recomputed else None})


def done(manifest: Manifest) -> set[str]:
    turns = manifest.run_dir.data.turns
    return {KEY} if turns.is_file() and parquet_metadata(turns).get(SPEC_HASH_KEY) == spec(manifest) else set()


def run(manifest: Manifest) -> str:
    """Read and check the round's logs, recompute missing p where asked, write the tables; returns the
    accounting line (rows in = rows out + rows quarantined)."""
    result = ingest(manifest.data.interactions, **options(manifest))
    check_deployed(manifest.data, result.turns, manifest.variants)
    for variant in manifest.variants:
        collecting_adapters(variant, result.turns, manifest.collecting_adapter)
    turns = recompute(manifest.data, manifest.model, manifest.policy_template, result.turns)
    write_tables(result, manifest.run_dir.data, {SPEC_HASH_KEY: spec(manifest)}, turns)
    return f"{result.accounting()}; {result.turns.height} turns"


STAGE = Stage("ingest", upstream=(), tasks=lambda m: [Task(KEY, run, (m,))], done=done,
              applies=lambda m: not m.seed_round)
