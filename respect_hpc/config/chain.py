"""Chaining rounds: the next round's manifest from this one and the logs its deployment produced.

Pure mapping work on the manifest as written (YAML in, YAML out), so everything a user set stays as set:
the round goes up by one, the new logs join ``data.interactions``, each variant's lineage gains its own
name (the policy name its deployment logs under: the deploy stage's, or whatever a real deployment used if
the variant names it), and an explicit ``previous_adapter`` is dropped so that KTO continues from this
round's selected policy (the default). From the seed round, the variants come from ``variants`` (the
paper's six when none are given).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from respect_hpc.config.schema import PAPER_VARIANTS


def next_round(raw: dict, logs: list[Path], variants: list[dict] | None = None) -> dict:
    """The manifest of the round after ``raw`` (a manifest as loaded from its YAML)."""
    out = copy.deepcopy(raw)
    out["round"] = int(raw["round"]) + 1
    out["data"] = {**out["data"], "interactions": [*(out["data"].get("interactions") or []), *map(str, logs)]}
    chosen = variants if variants is not None else out.get("variants")
    if chosen is None:
        chosen = [v.model_dump(mode="json", exclude_none=True) for v in PAPER_VARIANTS]
    out["variants"] = [_continued(dict(v)) for v in copy.deepcopy(chosen)]
    return out


def _continued(variant: dict) -> dict:
    variant.pop("previous_adapter", None)
    if variant.get("policies") is not None and variant["name"] not in variant["policies"]:
        variant["policies"] = [*variant["policies"], variant["name"]]
    return variant


def next_path(manifest: Path, round_: int) -> Path:
    """Where the next round's manifest goes: beside this one, ``<name>-round<R>.yaml``."""
    stem = re.sub(r"-round\d+$", "", manifest.stem)
    return manifest.with_name(f"{stem}-round{round_}.yaml")
