"""The run directory: where every table of an experiment lives (DESIGN.md).

    <workdir>/<experiment>/
      data/interactions.parquet, data/turns.parquet, data/quarantine.parquet
      round-<R>/metrics/round_metrics.parquet
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from respect_hpc.manifest import Manifest


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, manifest: Manifest) -> RunDir:
        return cls(manifest.workdir / manifest.experiment)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def round(self, round_: int) -> Path:
        return self.root / f"round-{round_}"

    def metrics(self, round_: int) -> Path:
        return self.round(round_) / "metrics"
