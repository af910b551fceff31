"""Shared fixtures: hand-made games in the public layouts, written to real files."""

import json
from pathlib import Path

import polars as pl
import pytest

KILOGRAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "kilogram"
CONTEXT = [f"page-{c}.png" for c in "ABCDEFGHIJ"]


def game(game_id="g1", **fields):
    """A valid 3-turn successful game; ``fields`` override any column."""
    row = {
        "game_id": game_id, "round": 1, "policy_name": "bp", "speaker": "alice", "end": "successful",
        "date": "2026-01-01", "dataset_alias": "test",
        "context": CONTEXT, "targets": ["page-B.png", "page-D.png"],
        "chat": ["the bird", "no, the other one", "yes, now the chair"],
        "clicks": [["page-A.png"], ["page-B.png"], ["page-B.png", "page-D.png"]],
        "prob_action": [0.2, 0.6, 0.9],
    }
    row.update(fields)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pl.DataFrame(rows).write_parquet(path)
    return path


@pytest.fixture
def kilogram():
    if not (KILOGRAM / "dense10.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}")
    return KILOGRAM


@pytest.fixture(scope="session")
def taught_decoder(tmp_path_factory):
    """A tiny IDEFICS2-8B replica taught to answer decoder prompts as IDEFICS2-8B does, plus the logs it saw."""
    from respect_hpc.data.logs import ingest
    from respect_hpc.simulation.teaching import teach_label_words
    from respect_hpc.model.replica import replica_like
    from respect_hpc.domain.synthetic import synthesize

    root = tmp_path_factory.mktemp("decoder")
    logs = root / "round-0.parquet"
    synthesize(60, seed=4, policies={"sft": 0.5}, rounds=[0]).write_parquet(logs)
    folder = replica_like("idefics2-8b", root / "model")
    teach_label_words(folder, ingest([logs]).turns)
    return folder, logs


def round_inputs(root: Path, games: int, model: Path | None = None,
                 policies: dict[str, float] | None = None) -> dict[str, Path]:
    """Synthetic logs (``games`` games of each of ``policies``, default the initial policy sft), D_0 and
    validation games, the images and a tiny IDEFICS2-8B replica.

    Images are the real KiloGram tangrams when ../shared/data/kilogram is present, else procedural ones.
    """
    from respect_hpc.model.replica import replica_like
    from respect_hpc.domain.synthetic import draw_procedural_images, load_image_bank, synthesize

    bank = load_image_bank(KILOGRAM if (KILOGRAM / "dense10.json").is_file() else None)
    paths = {"images": KILOGRAM / "tangram_pngs"}
    if bank.source == "procedural":
        paths["images"] = root / "images"
        draw_procedural_images(bank, paths["images"])
    for name, n, who, seed in (("logs", games, policies or {"sft": 0.5}, 3),
                               ("d0", max(games // 3, 4), {"human": 0.9}, 5),
                               ("validation", max(games // 4, 3), {"human": 0.9}, 6)):
        paths[name] = root / f"{name}.parquet"
        synthesize(n, seed=seed, policies=who, rounds=[0], bank=bank).write_parquet(paths[name])
    paths["model"] = model or replica_like("idefics2-8b", root / "model")
    return paths


def write_round(root: Path, *, variants: str = "[{name: b-fft, feedback: binary, objective: fft}]",
                training: str = "{epochs: 2, effective_batch: 8, micro_batch: 4, warmup_steps: 1}",
                extra: str = "", model: Path | None = None, games: int = 24, model_options: str = "",
                policies: dict[str, float] | None = None) -> Path:
    """A round ready to train (:func:`round_inputs`, ingested), with decoded feedback written directly:
    heuristic labels standing in for the decode stage."""
    import jobs.ingest
    from respect_hpc.domain.prompts import LABEL_VALUES
    from respect_hpc.domain.synthetic import follow_up_label

    inputs = round_inputs(root, games, model, policies)
    logs, d0, validation, images, model = (inputs[k] for k in ("logs", "d0", "validation", "images", "model"))
    run = root / "runs" / "t"
    turns = jobs.ingest.run([logs], run / "data", policies=None).turns.filter("has_follow_up")
    feedback = pl.concat([turns.select(
        "game_turn_id", "round", "policy", kind=pl.lit(kind),
        label=pl.Series([LABEL_VALUES[follow_up_label(f, labels)]
                         for f in turns["follow_up"]], dtype=pl.Int8))
        for kind, labels in (("binary", ("Positive", "Negative")), ("ternary", ("Positive", "Neutral", "Negative")))])
    (run / "round-1").mkdir(parents=True)
    feedback.write_parquet(run / "round-1" / "feedback.parquet")
    manifest = root / "round.yaml"
    manifest.write_text(f"""experiment: t
round: 1
workdir: {root / 'runs'}
data:
  interactions: [{logs}]
  seed_data: {d0}
  validation: {validation}
  images: {images}
model: {{path: {model}, dtype: fp32{model_options}}}
variants: {variants}
seeds: [1, 2]
training:
  fft: {training}
  rl: {training}
  kto: {training}
  zero_stage: null
{extra}""")
    return manifest


@pytest.fixture(scope="session")
def idefics2_interface(tmp_path_factory):
    """IDEFICS2-8B's config, tokenizer, chat template and processor (rebuilt offline), without weights."""
    from respect_hpc.model.replica import write_interface

    return write_interface("idefics2-8b", tmp_path_factory.mktemp("idefics2-8b"))
