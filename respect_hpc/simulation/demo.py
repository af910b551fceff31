"""The demo's inputs (``respect-hpc demo``), written once: synthetic logs of the round before, D_0 and
validation games, the tangram images (KiloGram's where present, drawn otherwise) and a tiny IDEFICS2-8B
replica taught to answer decoder prompts, so that its labels vary."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from respect_hpc.config.schema import Manifest
from respect_hpc.core.io import atomic_write_parquet
from respect_hpc.data.logs import ingest
from respect_hpc.domain.synthetic import DEFAULT_KILOGRAM, draw_procedural_images, load_image_bank, synthesize
from respect_hpc.model.replica import replica_like
from respect_hpc.simulation.inputs import build_model
from respect_hpc.simulation.teaching import teach_label_words


def demo_inputs(m: Manifest, games: int, report: Callable[[str], None] = print) -> None:
    bank = load_image_bank(DEFAULT_KILOGRAM)
    if m.data.images is not None and not m.data.images.exists():
        m.data.images.parent.mkdir(parents=True, exist_ok=True)
        if bank.source == "kilogram":
            m.data.images.symlink_to((DEFAULT_KILOGRAM / "tangram_pngs").resolve(), target_is_directory=True)
        else:
            draw_procedural_images(bank, m.data.images)
    files = {m.data.seed_data: (games // 3, {"human": 0.9}, 1), m.data.validation: (games // 4, {"human": 0.9}, 2)}
    if m.data.interactions:  # none in the seed round
        files[m.data.interactions[0]] = (games, {"sft": 0.45}, 0)
    for path, (n, policies, seed) in files.items():
        if path is not None and not path.exists():
            frame = synthesize(n, seed=seed, policies=policies, rounds=range(max(m.round, 1)), bank=bank,
                               max_turns=m.data.max_turns)
            if path == m.data.seed_data:  # D_0: successful games only
                frame = frame.filter(pl.col("end") == "successful")
            atomic_write_parquet(frame, path)
            report(f"{frame.height} synthetic games ({bank.source} images) -> {path}")
    if not m.model.path.exists():  # the same base in every round: taught on the logs, or on D_0 in the seed round
        turns = ingest(m.data.interactions or [m.data.seed_data], policies=None).turns
        report("building a tiny IDEFICS2-8B replica offline and teaching it the decoder's answers")
        build_model(m.model.path, lambda folder: teach_label_words(replica_like("idefics2-8b", folder), turns))
        report(f"tiny IDEFICS2-8B replica (random weights, taught to answer decoder prompts) -> {m.model.path}")
