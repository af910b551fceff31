"""Ingest stage: public-layout logs -> interactions.parquet, turns.parquet (+ quarantine.parquet)."""

from __future__ import annotations

from pathlib import Path

from respect_hpc.ingest import IngestResult, ingest
from respect_hpc.tables import atomic_write_parquet

INTERACTIONS_FILE = "interactions.parquet"
TURNS_FILE = "turns.parquet"
QUARANTINE_FILE = "quarantine.parquet"


def run(sources: list[str | Path], out_dir: str | Path, **options) -> IngestResult:
    """Read and check ``sources`` and write the normalised tables into ``out_dir``.

    ``options`` are those of :func:`respect_hpc.ingest.read_interactions`; with
    ``quarantine=True`` refused rows go to quarantine.parquet.
    """
    result = ingest(sources, **options)
    out_dir = Path(out_dir)
    atomic_write_parquet(result.interactions, out_dir / INTERACTIONS_FILE)
    atomic_write_parquet(result.turns, out_dir / TURNS_FILE)
    quarantine = out_dir / QUARANTINE_FILE
    if result.quarantine.height:
        atomic_write_parquet(result.quarantine, quarantine)
    else:
        quarantine.unlink(missing_ok=True)
    return result
