"""The run directory: where every table of an experiment lives (DESIGN.md).

    <workdir>/<experiment>/
      data/interactions.parquet, data/turns.parquet, data/quarantine.parquet
      round-<R>/metrics/round_metrics.parquet

A run directory is private to its owner (mode 0700): submitit keeps each job's
pickled function under ``logs/``, and whoever can write there runs code as the user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from respect_hpc.domain.policies import SEED_POLICY
from respect_hpc.config.schema import Manifest


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, manifest: Manifest) -> RunDir:
        return cls(manifest.workdir / manifest.experiment)

    def make_private(self) -> Path:
        """Create the run directory (0700), or take group and other access away from an existing one."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.root.stat().st_uid == os.getuid() and self.root.stat().st_mode & 0o077:
            self.root.chmod(0o700)
        return self.root

    @property
    def data(self) -> Path:
        return self.root / "data"

    def round(self, round_: int) -> Path:
        return self.root / f"round-{round_}"

    def policy(self, round_: int, variant: str) -> Path:
        """The adapter a round selected for a variant (what the next round deploys or continues from)."""
        return self.round(round_) / "policies" / variant

    def previous_policy(self, round_: int, variant: str) -> Path:
        """What a variant of ``round_`` continues from: its policy of the round before; in round 1, the seed
        policy every variant starts from."""
        return self.policy(round_ - 1, SEED_POLICY if round_ == 1 else variant)

    def metrics(self, round_: int) -> Path:
        return self.round(round_) / "metrics"
