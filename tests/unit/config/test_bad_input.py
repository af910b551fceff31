"""Every manifest field and every input column, given bad values: each is refused by `respect-hpc validate` or
`respect-hpc ingest` with one line naming the file, the line or row, the field and what was expected, exit 2,
never a traceback and never a silent acceptance.

The manifest cases are generated from the manifest schema itself, so a field added later is probed too."""

from __future__ import annotations

import typing
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import game, write_jsonl, write_parquet
from pydantic import BaseModel
from typer.testing import CliRunner

from respect_hpc.cli.commands import app
from respect_hpc.config.schema import Manifest

BASE = {
    "experiment": "probe", "round": 1, "workdir": "runs", "policy_template": "respect-listener@1",
    "data": {"interactions": ["logs.jsonl"], "seed_data": "logs.jsonl", "validation": "logs.jsonl",
             "images": "images", "max_turns": 10},
    "model": {"path": "model", "gguf_file": "m.gguf", "dtype": "fp32", "image_size": 224, "image_splitting": False, "attention": "sdpa"},
    "decoder": {"model": {"path": "model", "gguf_file": "m.gguf", "dtype": "fp32", "image_size": 224,
                          "image_splitting": False, "attention": "sdpa"},
                "templates": {"binary": "respect-binary@2"}, "shards": 2, "batch_tokens": 2048, "chunk_rows": 1000},
    "variants": [{"name": "b-fft", "feedback": "binary", "objective": "fft", "init": "base",
                  "previous_adapter": "model"}],
    "seeds": [1],
    "training": {**{o: {} for o in ("fft", "rl", "kto", "seed")}, "zero_stage": 2, "checkpoint_every": 0,
                 "d0_augmentation": "official", "d0_augmentation_seed": 42, "preset": "paper", "packing": "game",
                 "vision_cache": True, "prefetch": True},
    "validation": {"decoding": "sample", "constrained": True, "constraint": "official", "turns": 390,
                   "max_new_tokens": 10},
    "sweep": {"learning_rate": [1e-4]},
    "tracking": {"backend": "tensorboard", "project": "probe", "online": False},
    "cluster": {"executor": "local", "partition": "gpu", "account": "lab", "qos": "normal", "constraint": "a100",
                "setup": ["module load cuda"], "additional_parameters": {"reservation": "lab"},
                "mail": {"user": "me@lab.org", "types": ["FAIL"]},
                "stages": {"train": {"gpus": 1, "cpus": 1, "mem_gb": 4, "time_min": 60, "nodes": 1,
                                     "max_parallel": 2, "tasks_per_node": 1}}},
    "simulation": {"kilogram": "kilogram", "games": 4, "shards": 1, "seed": 0, "control": True, "implicit": 0.3,
                   "misleading": 0.05, "silent": 0.05, "undo": 0.35, "pool": "deploy", "max_turns": 10,
                   "decoding": "official", "batch": 8},
}
HYPERPARAMETERS = {"optimizer": "adamw", "learning_rate": 1e-4, "schedule": "cosine", "epochs": 2, "warmup_steps": 0,
                   "weight_decay": 0.0, "effective_batch": 8, "micro_batch": 4, "entropy_weight": 0.0,
                   "temperature": 1.0, "label_smoothing": 0.0, "beta": 0.1, "lambda_desirable": 1.0,
                   "lambda_undesirable": 1.0, "negatives_per_5_positives": 1.0, "lora_r": 8, "lora_alpha": 16,
                   "lora_dropout": 0.1, "lora_placement": "paper", "lora_init": "gaussian", "negatives": "per_epoch",
                   "kto_length_normalised": False}
for _objective in ("fft", "rl", "kto", "seed"):
    BASE["training"][_objective] = dict(HYPERPARAMETERS)


def _leaves(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, typing.Any]]:
    """(location, annotation) of every field of the schema; list and mapping entries at their first key."""
    found = []
    for name, field in model.model_fields.items():
        loc, annotation = (*prefix, name), field.annotation
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        nested = [a for a in (args or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if origin is list and nested:
            found += _leaves(nested[0], (*loc, 0))
        elif origin is dict and nested:
            found += _leaves(nested[0], (*loc, "train"))
        elif nested:
            found += _leaves(nested[0], loc)
        else:
            found.append((loc, annotation))
    return found


def _bad_values(annotation) -> list[object]:
    """Values no field of this annotation may take: a mapping (or, for mappings, a list), then by kind."""
    if typing.get_origin(annotation) is dict:
        return [["oops"], "oops"]
    kinds = set(typing.get_args(annotation) or (annotation,))
    values: list[object] = [{"oops": [1]}]
    if kinds & {int, float}:
        values += ["many", True]
    elif bool in kinds:
        values += ["maybe", 3]
    else:
        values += [True, [["nested"]]]
    return values


def _loc_text(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc))


def _set(tree: dict, loc: tuple, value: object) -> dict:
    node = tree
    for part in loc[:-1]:
        node = node[part]
    node[loc[-1]] = value
    return tree


def _manifest_folder(tmp_path: Path) -> Path:
    (tmp_path / "logs.jsonl").write_text("")
    for folder in ("model", "images", "kilogram"):
        (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / "kilogram" / "dense.json").write_text("{}")
    (tmp_path / "m.gguf").write_text("")
    return tmp_path


CASES = [(loc, value) for loc, annotation in _leaves(Manifest) for value in _bad_values(annotation)]


def test_the_base_manifest_is_good_and_every_field_is_probed(tmp_path):
    folder = _manifest_folder(tmp_path)
    (folder / "round.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(folder / "round.yaml")])
    assert result.exit_code == 0 and result.output == "ok\n", result.output
    assert len({loc for loc, _ in CASES}) >= 90  # every leaf of the schema (3 x 19 hyperparameters among them)


@pytest.mark.parametrize("loc, value", CASES, ids=[f"{_loc_text(loc)}={value!r}" for loc, value in CASES])
def test_every_manifest_field_refuses_a_bad_value_in_one_line(tmp_path, loc, value):
    import copy

    folder = _manifest_folder(tmp_path)
    path = folder / "round.yaml"
    path.write_text(yaml.safe_dump(_set(copy.deepcopy(BASE), loc, value), sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    text = _loc_text(loc)
    assert lines and all(line.startswith(f"{path}:") for line in lines), lines
    assert any(f": {text}: " in line or f": {text}." in line or f": {text}[" in line for line in lines), lines



def _turn_row() -> dict:
    return {"game_id": "g1", "turn_id": 0, "chats": ["the bird"], "currently_selected": [], "selected": ["page-A.png"],
            "deselected": [], "clicks": [["page-A.png"]], "context": game()["context"],
            "targets": ["page-A.png"], "end": "successful", "policy_name": "bp", "round": 1, "prob_action": 0.5}


INTERACTION_COLUMNS = ["game_id", "policy_name", "chat", "context", "targets", "clicks", "end", "round",
                       "prob_action"]
TURN_COLUMNS = ["game_id", "turn_id", "chats", "currently_selected", "selected", "deselected", "clicks", "context",
                "targets", "end", "policy_name", "round"]
COLUMN_CASES = ([("interaction", c, kind) for c in INTERACTION_COLUMNS for kind in ("wrong type", "null", "absent")
                 if c != "prob_action" or kind == "wrong type"]  # p may be unlogged
                + [("turn", c, kind) for c in TURN_COLUMNS for kind in ("wrong type", "null", "absent")
                   if c != "clicks" or kind == "wrong type"])  # the turn layout's selected/deselected say it all


def _wrong_type(value: object) -> object:
    return {"oops": 1} if not isinstance(value, dict) else 1


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("layout, column, kind", COLUMN_CASES,
                         ids=[f"{layout}-{column}-{kind}" for layout, column, kind in COLUMN_CASES])
def test_every_input_column_refuses_bad_cells(tmp_path, layout, column, kind, fmt):
    good = [game("g0"), game("g1")] if layout == "interaction" else [{**_turn_row(), "game_id": "g0"}, _turn_row()]
    bad = dict(good[1])
    if kind == "absent":
        bad.pop(column)
    else:
        bad[column] = None if kind == "null" else _wrong_type(bad[column])
    rows = [good[0], bad]
    path = tmp_path / f"logs.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        try:  # a Parquet column holds one type: a wrong-typed cell makes the whole column wrong-typed
            write_parquet(path, rows)
        except (TypeError, pl.exceptions.PolarsError):
            write_parquet(path, [{**r, column: _wrong_type(good[0][column])} for r in rows])
    result = CliRunner().invoke(app, ["ingest", str(path), "--out", str(tmp_path / "out")])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    message = " ".join(result.output.split())
    assert result.exit_code == 2, (message, result.exit_code)
    assert message.startswith(f"error: {path}:"), message
    names = {column} | ({"chat"} if column in ("chats", "selected", "deselected", "currently_selected") else set())
    names |= {"clicks"} if column in ("selected", "deselected", "currently_selected") else set()
    names |= {"turn_id"} if column == "turn_id" else set()
    assert any(f" {name}" in message or f"{name}:" in message for name in names), message
    assert not (tmp_path / "out" / "turns.parquet").exists()
