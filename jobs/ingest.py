"""Ingest stage: public-layout logs -> interactions.parquet, turns.parquet (+ quarantine.parquet)."""

from __future__ import annotations

from pathlib import Path

from respect_hpc.hashing import file_digest, spec_hash
from respect_hpc.ingest import IngestResult, ingest
from respect_hpc.manifest import Manifest
from respect_hpc.rundir import RunDir
from respect_hpc.tables import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata

INTERACTIONS_FILE = "interactions.parquet"
TURNS_FILE = "turns.parquet"
QUARANTINE_FILE = "quarantine.parquet"


def run(sources: list[str | Path], out_dir: str | Path, metadata: dict[str, str] | None = None,
        **options) -> IngestResult:
    """Read and check ``sources`` and write the normalised tables into ``out_dir``.

    ``options`` are those of :func:`respect_hpc.ingest.read_interactions`; with
    ``quarantine=True`` refused rows go to quarantine.parquet.
    """
    result = ingest(sources, **options)
    out_dir = Path(out_dir)
    atomic_write_parquet(result.interactions, out_dir / INTERACTIONS_FILE)
    quarantine = out_dir / QUARANTINE_FILE
    if result.quarantine.height:
        atomic_write_parquet(result.quarantine, quarantine)
    else:
        quarantine.unlink(missing_ok=True)
    atomic_write_parquet(result.turns, out_dir / TURNS_FILE, metadata)  # written last: the stage's marker
    return result


def _options(manifest: Manifest) -> dict:
    return {"quarantine": True, "max_turns": manifest.data.max_turns, "max_round": manifest.round - 1}


def stage_hash(manifest: Manifest) -> str:
    return spec_hash({"sources": [file_digest(p) for p in manifest.data.interactions], **_options(manifest)})


def is_done(manifest: Manifest) -> bool:
    turns = RunDir.of(manifest).data / TURNS_FILE
    return turns.is_file() and parquet_metadata(turns).get(SPEC_HASH_KEY) == stage_hash(manifest)


def stage(manifest: Manifest) -> str:
    """The ingest stage of a round: the logs of every earlier round; returns the accounting line."""
    result = run(manifest.data.interactions, RunDir.of(manifest).data, {SPEC_HASH_KEY: stage_hash(manifest)},
                 **_options(manifest))
    return f"{result.accounting()}; {result.turns.height} turns"
