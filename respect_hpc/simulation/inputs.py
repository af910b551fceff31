"""What a simulated experiment's manifest names and lacks, written once: D_0 and validation games spoken by
simulated people, the feedback decoder and the policy base, tiny IDEFICS2-8B replicas taught what a real
checkpoint brings to a round (teaching.py).

Every model is built in a partial folder beside its place and renamed into it once done, so a run killed
while building or teaching one builds it again instead of going on with a half-taught model.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import polars as pl

from respect_hpc.config.schema import Manifest
from respect_hpc.core.errors import RespectError
from respect_hpc.core.io import atomic_write_parquet
from respect_hpc.domain.simulator import description_pool, human_games
from respect_hpc.domain.synthetic import load_image_bank
from respect_hpc.model.replica import replica_like
from respect_hpc.simulation.teaching import teach_decoder, teach_listener

SIMULATED_IMAGE_TOKENS = 4  # the policy base's tokens an image (IDEFICS2-8B: 64), so that it trains on a CPU


class SimulationError(RespectError, ValueError):
    """A simulated setting that cannot be built (no KiloGram descriptions, too few tangrams)."""


def build_model(folder: Path, build: Callable[[Path], object]) -> None:
    """Run ``build`` on a partial folder beside ``folder`` and rename it into place once done."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    partial.rename(folder)


def seed_descriptions(m: Manifest) -> dict[str, list[str]]:
    """The seed half of each tangram's KiloGram descriptions in play (D_0, validation, teaching)."""
    sim = m.simulation
    bank = load_image_bank(sim.kilogram, dense="dense.json")
    if bank.source != "kilogram":
        raise SimulationError(f"simulation.kilogram: no dense.json in '{sim.kilogram}'")
    try:
        return description_pool(bank.descriptions, "seed", sim.tangrams, sim.descriptions)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None


def _policy_base(m: Manifest, folder: Path, descriptions: dict[str, list[str]]) -> list[str]:
    """Build and teach the policy base in ``folder`` (and the decoder's answers, where it is the decoder too);
    returns the lines to report."""
    sim, said = m.simulation, []
    replica_like("idefics2-8b", folder, image_tokens=SIMULATED_IMAGE_TOKENS)
    if sim.teach_steps:
        losses = teach_listener(folder, m.data.images, descriptions, sim.speaker_settings(pool="seed"),
                                template=m.policy_template, image_size=m.model.image_size, steps=sim.teach_steps)
        said.append(f"policy base taught the listener in {sim.teach_steps} steps (loss "
                    f"{sum(losses[:20]) / len(losses[:20]):.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f})")
    if m.decoder_model.path == m.model.path:
        said += _decoder_lessons(m, folder, descriptions)
    return said


def _decoder_lessons(m: Manifest, folder: Path, descriptions: dict[str, list[str]]) -> list[str]:
    """Teach the replica in ``folder`` the decoder's answers; returns the lines to report."""
    sim = m.simulation
    teach_decoder(folder, descriptions, sim.speaker_settings(pool="seed"), sim.games, sim.decoder_steps)
    return ["replica taught the decoder's answers"]


def _decoder(m: Manifest, folder: Path, descriptions: dict[str, list[str]]) -> list[str]:
    """Build the decoder, a replica of its own, and teach it the decoder's answers."""
    replica_like("idefics2-8b", folder)
    return _decoder_lessons(m, folder, descriptions)


def _built(job: tuple[Callable, Manifest, Path, dict], threads: int) -> list[str]:
    """One model built in its partial folder with ``threads`` torch threads (a worker process's work)."""
    import torch

    torch.set_num_threads(threads)
    build, m, folder, descriptions = job
    said = []
    build_model(folder, lambda partial: said.extend(build(m, partial, descriptions)))
    return said


def simulation_inputs(m: Manifest, report: Callable[[str], None] = print) -> None:
    """Write what a simulated experiment's manifest names and lacks: D_0 (the successful games of
    ``simulation.games`` simulated human-human games) and validation games (a quarter as many), spoken from
    the seed half of each tangram's descriptions; the decoder, a tiny IDEFICS2-8B replica taught to answer
    decoder prompts; the policy base, a tiny IDEFICS2-8B replica with ``SIMULATED_IMAGE_TOKENS`` tokens an
    image, taught the listener's turns for ``simulation.teach_steps`` steps (the same replica taught both
    where the manifest names no decoder model). The two models are taught side by side, each in a process
    of its own with half the cores (teaching a tiny model gains about 1.4x from a second thread, so two
    processes of one thread each finish sooner than the two in turn)."""
    sim = m.simulation
    if sim is None:
        return
    descriptions = seed_descriptions(m)
    settings = sim.speaker_settings(pool="seed")
    made = {m.data.seed_data: (sim.games, 1), m.data.validation: (max(sim.games // 4, 4), 2)}
    for path, (n, seed) in made.items():
        if path is not None and not path.exists():
            frame = pl.DataFrame(human_games(n, descriptions, settings, seed=seed)).drop("truth")
            if path == m.data.seed_data:
                frame = frame.filter(pl.col("end") == "successful")
            atomic_write_parquet(frame, path)
            report(f"{frame.height} simulated human-human games -> {path}")
    jobs = {}
    if not m.model.path.exists():
        jobs[f"tiny IDEFICS2-8B replica, policy base -> {m.model.path}"] = (_policy_base, m, m.model.path,
                                                                            descriptions)
    if m.decoder_model.path != m.model.path and not m.decoder_model.path.exists():
        jobs[f"tiny IDEFICS2-8B replica taught to answer decoder prompts -> {m.decoder_model.path}"] = (
            _decoder, m, m.decoder_model.path, descriptions)
    if not jobs:
        return
    report("teaching " + " and ".join("the policy base" if job[0] is _policy_base else "the decoder"
                                      for job in jobs.values()) + " (tiny replicas)")
    cores = os.cpu_count() or 1
    if len(jobs) == 1 or cores < 2:
        done = {done: _built(job, cores) for done, job in jobs.items()}
    else:
        context = multiprocessing.get_context("spawn")  # no torch threads forked
        with ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
            futures = {done: pool.submit(_built, job, cores // len(jobs)) for done, job in jobs.items()}
            done = {done: future.result() for done, future in futures.items()}
    for line, said in done.items():
        for text in said:
            report(text)
        report(line)
