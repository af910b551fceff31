"""Ingest stage: public-layout logs -> interactions.parquet, turns.parquet (+ quarantine.parquet)."""

from __future__ import annotations

from pathlib import Path

from respect_hpc.training.propensity import check_deployed, recompute
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.domain.policies import PUBLIC_POLICIES
from respect_hpc.data.logs import IngestResult, ingest
from respect_hpc.domain.policies import CONTROL_POLICY
from respect_hpc.config.schema import Manifest
from respect_hpc.model.loading import model_fingerprint
from respect_hpc.core.rundir import RunDir
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata

INTERACTIONS_FILE = "interactions.parquet"
TURNS_FILE = "turns.parquet"
QUARANTINE_FILE = "quarantine.parquet"


def run(sources: list[str | Path], out_dir: str | Path, metadata: dict[str, str] | None = None,
        **options) -> IngestResult:
    """Read and check ``sources`` and write the normalised tables into ``out_dir``.

    ``options`` are those of :func:`respect_hpc.data.logs.read_interactions`; with
    ``quarantine=True`` refused rows go to quarantine.parquet.
    """
    result = ingest(sources, **options)
    write(result, result.turns, Path(out_dir), metadata)
    return result


def write(result: IngestResult, turns, out_dir: Path, metadata: dict[str, str] | None) -> None:
    """The tables of an ingest, turns.parquet last: the stage's marker."""
    atomic_write_parquet(result.interactions, out_dir / INTERACTIONS_FILE)
    quarantine = out_dir / QUARANTINE_FILE
    if result.quarantine.height:
        atomic_write_parquet(result.quarantine, quarantine)
    else:
        quarantine.unlink(missing_ok=True)
    atomic_write_parquet(turns, out_dir / TURNS_FILE, metadata)


def _options(manifest: Manifest) -> dict:
    """The public policy names, and every name the manifest gives a policy (variants, their lineages, the
    simulated deployment's control) are accepted."""
    named = {*(v.name for v in manifest.variants), *(p for v in manifest.variants for p in v.policies or ())}
    if manifest.simulation is not None:
        named.add(CONTROL_POLICY)
    return {"quarantine": True, "max_turns": manifest.data.max_turns, "max_round": manifest.round - 1,
            "policies": sorted({*PUBLIC_POLICIES, *named})}


def stage_hash(manifest: Manifest) -> str:
    recomputed = manifest.data.propensity == "recompute"  # p then depends on the deployed policies too
    return spec_hash({"sources": [file_digest(p) for p in manifest.data.interactions], **_options(manifest),
                      "deployed": {k: file_digest(v) for k, v in sorted(manifest.data.deployed.items())}
                      if recomputed else None,
                      "model": model_fingerprint(manifest.model, RunDir.of(manifest).root / "cache" /
                                                 "fingerprints.json") if recomputed else None})


def is_done(manifest: Manifest) -> bool:
    turns = RunDir.of(manifest).data / TURNS_FILE
    return turns.is_file() and parquet_metadata(turns).get(SPEC_HASH_KEY) == stage_hash(manifest)


def stage(manifest: Manifest) -> str:
    """The ingest stage of a round: the logs of every earlier round (p recomputed where they lack it and the
    manifest asks); returns the accounting line."""
    result = ingest(manifest.data.interactions, **_options(manifest))
    check_deployed(manifest, result.turns)
    turns = recompute(manifest, result.turns)
    write(result, turns, RunDir.of(manifest).data, {SPEC_HASH_KEY: stage_hash(manifest)})
    return f"{result.accounting()}; {result.turns.height} turns"
