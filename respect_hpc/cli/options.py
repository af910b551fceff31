"""The command line's shared options and how it reads what they name (manifests, cluster profiles,
variant lists), with the manifest loader's FILE:LINE errors.

Light on purpose: `--help`, `validate` and `schema` import this and the config layer, never torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from respect_hpc.config.loading import ManifestError, load_manifest, load_part
from respect_hpc.config.schema import ClusterSection, Manifest, Variant
from respect_hpc.core.errors import RespectError
from respect_hpc.model.families import model_problems

EXECUTORS = ("local", "slurm", "debug")

ManifestArg = Annotated[Path, typer.Argument(help="Round manifest (YAML).")]
Sources = Annotated[list[Path], typer.Argument(help="Parquet or JSON-lines logs in the public interaction or "
                                                    "turn layout, or folders of them.")]
Quarantine = Annotated[bool, typer.Option("--quarantine", help="Keep bad rows aside (quarantine.parquet) "
                                                               "instead of stopping at the first.")]
MaxTurns = Annotated[int, typer.Option(min=1, max=26, help="Turn limit of a game (1 to 26: a game has at most "
                                                              "26 images); longer games are bad rows.")]
Seed = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the bootstrap.")]
Resamples = Annotated[int, typer.Option(min=1, max=10_000_000, help="Bootstrap resamples per interval.")]
Policies = Annotated[list[str] | None, typer.Option("--policy", help="A policy name to accept besides the "
                                                                     "public ones (repeatable).")]
MaxRound = Annotated[int | None, typer.Option(help="Highest round to accept; later rounds are bad rows.")]
Executor = Annotated[str | None, typer.Option(help="Override cluster.executor: local, slurm or debug.")]
Workdir = Annotated[Path | None, typer.Option(help="Override the manifest's workdir (where run directories go).")]
Overrides = Annotated[list[str] | None, typer.Argument(
    help="KEY=VALUE overrides of the manifest: dotted paths, a variant by its name, the value read as YAML "
         "(training.fft.epochs=3 variants.b-fft.objective=rl seeds=[1,2]); checked as the manifest is.",
    show_default=False)]
ClusterProfile = Annotated[Path | None, typer.Option("--cluster", help="A cluster profile (YAML with a cluster "
                                                                       "section, see slurm/profiles/) replacing "
                                                                       "the manifest's.")]


class OptionError(RespectError, ValueError):
    """A command-line option with a value the command cannot use."""


def first_problem(exc: ManifestError) -> str:
    more = len(exc.problems) - 1
    return exc.problems[0] + (f" (and {more} more: respect-hpc validate)" if more else "")


def manifest(path: Path, executor: str | None = None, *, workdir: Path | None = None,
             cluster: Path | None = None, check_files: bool = True, overrides: list[str] | None = None) -> Manifest:
    """A manifest as a command runs it (``KEY=VALUE`` overrides, ``--workdir`` and ``--cluster`` applied); its
    first problem as the error otherwise."""
    try:
        m = load_manifest(path, check_files=check_files, overrides=overrides or (), checks=model_problems)
        profile = load_part(cluster, ClusterSection, key="cluster") if cluster is not None else None
    except ManifestError as exc:
        raise OptionError(first_problem(exc)) from None
    if executor not in (None, *EXECUTORS):
        raise OptionError(f"--executor {executor!r}: expected local, slurm or debug")
    updates = {**({"workdir": workdir.absolute()} if workdir is not None else {}),
               **({"cluster": profile} if profile is not None else {})}
    return m.model_copy(update=updates) if updates else m


def variants_file(path: Path | None) -> list[dict] | None:
    """A YAML list of variants (as a manifest's ``variants``), checked; None without a file."""
    if path is None:
        return None
    try:
        variants = load_part(path, list[Variant])
    except ManifestError as exc:
        raise OptionError(first_problem(exc)) from None
    return [v.model_dump(mode="json", exclude_none=True) for v in variants]
