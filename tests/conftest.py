"""Shared fixtures: hand-made games in the public layouts, written to real files, and the command line run in
this process."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
KILOGRAM = REPO.parent / "shared" / "data" / "kilogram"
CONTEXT = [f"page-{c}.png" for c in "ABCDEFGHIJ"]


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


MULTIMODAL = ["idefics2-8b", "smolvlm", "qwen2.5-vl"]  # the interfaces (one a family) every model stage is tested on


def multimodal_replica(like: str, folder: Path) -> Path:
    """A tiny replica of ``like``; skips, saying why, where the package of its tokenizer is missing (`make venv`
    installs every one)."""
    from respect_hpc.model.families import FamilyError
    from respect_hpc.model.replica import replica_like

    try:
        return replica_like(like, folder)
    except FamilyError as exc:
        pytest.skip(str(exc))


def cli(*args, cwd: Path | None = None) -> Done:
    """``respect-hpc ARGS`` in this process (typer's CliRunner): its exit status, stdout and stderr. Tests where a
    real process is the point (signals, kills, the installed entry point) start one themselves."""
    from typer.testing import CliRunner

    from respect_hpc.cli import app

    here = Path.cwd()
    os.chdir(cwd or here)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(here)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug: its traceback, not an exit status
    return Done(result.exit_code, result.stdout, result.stderr)


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
    from respect_hpc.domain.synthetic import synthesize
    from respect_hpc.model.replica import replica_like
    from respect_hpc.simulation.teaching import teach_label_words

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
    from respect_hpc.domain.synthetic import draw_procedural_images, load_image_bank, synthesize
    from respect_hpc.model.replica import replica_like

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


def save_collecting_adapters(run, model: Path, turns: pl.DataFrame) -> None:
    """An adapter for each (policy, round) of ``turns`` where the run directory keeps what it deployed (KTO's
    reference): seeded, with B drawn away from zero so that each policy scores differently."""
    import torch

    from respect_hpc.config.schema import ModelSection
    from respect_hpc.model.loading import load_policy

    for k, (policy, round_) in enumerate(turns.select("policy", "round").unique().sort("policy", "round").rows()):
        adapter = load_policy(ModelSection(path=model, dtype="fp32"), seed=k)
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(100 + k))
        adapter.save_pretrained(run.policy(round_, policy))


def write_round(root: Path, *, variants: str = "[{name: b-fft, feedback: binary, objective: fft}]",
                training: str = "{epochs: 2, effective_batch: 8, micro_batch: 4, warmup_steps: 1}",
                extra: str = "", model: Path | None = None, games: int = 24, model_options: str = "",
                policies: dict[str, float] | None = None) -> Path:
    """A round ready to train (:func:`round_inputs`, ingested), with decoded feedback written directly:
    heuristic labels standing in for the decode stage."""
    from respect_hpc.core.rundir import RunDir
    from respect_hpc.data.logs import ingest, write_tables
    from respect_hpc.domain.prompts import LABEL_VALUES
    from respect_hpc.domain.synthetic import follow_up_label

    inputs = round_inputs(root, games, model, policies)
    logs, d0, validation, images, model = (inputs[k] for k in ("logs", "d0", "validation", "images", "model"))
    run = RunDir(root / "runs" / "t")
    result = ingest([logs], policies=None)
    write_tables(result, run.data)
    turns = result.turns.filter("has_follow_up")
    feedback = pl.concat([turns.select(
        "game_turn_id", "round", "policy", kind=pl.lit(kind),
        label=pl.Series([LABEL_VALUES[follow_up_label(f, labels)]
                         for f in turns["follow_up"]], dtype=pl.Int8))
        for kind, labels in (("binary", ("Positive", "Negative")), ("ternary", ("Positive", "Neutral", "Negative")))])
    run.round(1).mkdir(parents=True)
    feedback.write_parquet(run.round_feedback(1))
    if "objective: kto" in variants:
        save_collecting_adapters(run, model, result.turns)
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


def write_decode_round(root: Path, model: Path, logs: list[Path], round_: int = 1, shards: int = 2,
                       chunk_rows: int = 4096) -> Path:
    """A manifest of round ``round_`` that decodes ``logs`` with ``model`` in ``shards`` (binary and ternary
    variants), nothing run yet."""
    import textwrap

    path = root / f"round-{round_}.yaml"
    path.write_text(textwrap.dedent(f"""\
        experiment: test
        round: {round_}
        workdir: {root / 'runs'}
        data: {{interactions: [{', '.join(map(str, logs))}]}}
        model: {{path: {model}, dtype: fp32}}
        decoder: {{shards: {shards}, batch_tokens: 1024, chunk_rows: {chunk_rows}}}
        variants:
          - {{name: b-fft, feedback: binary, objective: fft}}
          - {{name: t-fft, feedback: ternary, objective: fft}}
        """))
    return path


def write_logged_round(root: Path, model: Path, executor: str = "local", extra_variants: str = "") -> Path:
    """Synthetic logs, D_0, validation games and a manifest naming them and ``model`` (no stage run yet).

    ``model`` is the session's tiny model taught to answer with label words (conftest.taught_decoder):
    a random-weight one may label a whole round negative, leaving FFT nothing to train on. A KTO variant
    among ``extra_variants`` finds the adapters that collected the logs in the run directory."""
    inputs = round_inputs(root, games=10, model=model)
    if "objective: kto" in extra_variants:
        from respect_hpc.core.rundir import RunDir
        from respect_hpc.data.logs import ingest

        save_collecting_adapters(RunDir(root / "runs" / "tiny"), inputs["model"],
                                 ingest([inputs["logs"]], policies=None).turns)
    manifest = root / "round.yaml"
    manifest.write_text(f"""experiment: tiny
round: 1
workdir: {root / 'runs'}
data:
  interactions: [{inputs['logs']}]
  seed_data: {inputs['d0']}
  validation: {inputs['validation']}
  images: {inputs['images']}
model: {{path: {inputs['model']}, dtype: fp32}}
decoder: {{shards: 2, batch_tokens: 2048}}
variants:
  - {{name: b-fft, feedback: binary, objective: fft}}
{extra_variants}seeds: [1, 2]
training:
  fft: {{epochs: 1, effective_batch: 8, micro_batch: 4, warmup_steps: 1}}
  kto: {{epochs: 1, effective_batch: 8, micro_batch: 4, warmup_steps: 1}}
  zero_stage: null
cluster:
  executor: {executor}
""")
    return manifest
