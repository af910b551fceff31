"""A run directory in the layout of the public ReSpect release: each round's selected adapters as PEFT folders
with a model card, and the run's tables as a dataset with a card whose ``configs:`` name them
(``interaction``, ``feedback_decoder_binary``, ``feedback_decoder_ternary``), ready for ``huggingface-cli
upload``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

from respect_hpc.core.errors import RespectError
from respect_hpc.core.io import adapter_problem, atomic_copy_tree, atomic_write_parquet, atomic_write_text
from respect_hpc.core.rundir import RunDir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ExportError(RespectError, ValueError):
    """A run directory with nothing to export, or a selected adapter that is damaged."""


@dataclass
class Exported:
    adapters: list[Path] = field(default_factory=list)
    configs: dict[str, Path] = field(default_factory=dict)  # dataset config -> its Parquet file


def _model_card(recorded: dict, row: dict) -> str:
    """``recorded``: the manifest the run directory recorded (manifest.lock.json), as JSON."""
    variant = next((v for v in recorded.get("variants", []) if v.get("name") == row["variant"]), {})
    training = recorded.get("training", {})
    hp = training.get(variant.get("objective", ""), {})
    front = {"base_model": str(recorded.get("model", {}).get("path", "?")), "library_name": "peft",
             "tags": ["respect", "respect-hpc", "lora", "multiref"]}
    facts = [("experiment", recorded.get("experiment", "?")), ("round", row["round"]), ("variant", row["variant"]),
             ("feedback", variant.get("feedback", "?")), ("objective", variant.get("objective", "?")),
             ("lineage", ", ".join(variant.get("policies") or []) or "the variant's default"),
             ("preset", training.get("preset", "?")), ("sweep cell", row["cell"]), ("seed", row["seed"]),
             ("epoch", row["epoch"]), ("validation exact match", f"{row['val_exact_match']:.4f}"),
             ("mean over seeds", f"{row['mean_val_exact_match']:.4f} ({row['seeds']} seeds)"),
             ("learning rate", hp.get("learning_rate", "?")),
             ("LoRA", f"r {hp.get('lora_r', '?')}, alpha {hp.get('lora_alpha', '?')}, {hp.get('lora_placement', '?')} "
                      f"placement, {hp.get('lora_init', '?')} init")]
    table = "\n".join(f"| {k} | {v} |" for k, v in facts)
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {facts[0][1]}: {row['variant']}, "
            f"round {row['round']}\n\nA LoRA adapter trained by respect-hpc (ReSpect: retrospective learning from "
            f"past interactions) and selected on the human-human validation turns by exact match.\n\n"
            f"| | |\n|---|---|\n{table}\n\nLoad it with PEFT on its base model: "
            "`PeftModel.from_pretrained(base, this_folder)`.\n")


def _dataset_card(experiment: str, configs: dict[str, Path], root: Path) -> str:
    front = {"configs": [{"config_name": name, "data_files": [{"split": "train",
                                                              "path": path.relative_to(root).as_posix()}]}
                         for name, path in sorted(configs.items())],
             "tags": ["respect", "respect-hpc", "multiref"]}
    listed = "\n".join(f"- `{name}`: `{path.relative_to(root).as_posix()}`" for name, path in sorted(configs.items()))
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {experiment}\n\nInteractions and decoded "
            f"feedback of a respect-hpc run, in the layout of the public ReSpect release:\n\n{listed}\n")


def export(root: Path, out: Path) -> Exported:
    """The run directory ``root``'s chosen adapters of every round (with model cards) under ``out/adapters``,
    its tables under ``out/dataset``."""
    run = RunDir(root)
    try:
        recorded = json.loads(run.manifest_lock.read_text())["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ExportError(f"{root}: no readable {run.manifest_lock.name}: not a run directory, or nothing was run "
                          "in it") from None
    done = Exported()
    for round_ in run.rounds():
        if not run.selection(round_).is_file():
            continue
        for row in pl.read_parquet(run.selection(round_)).filter("chosen").iter_rows(named=True):
            source = run.policy(round_, row["variant"])
            problem = adapter_problem(source)
            if problem:
                raise ExportError(f"{source}: the selected adapter of {row['variant']} (round {round_}) is not "
                                  f"whole: {problem}; run the round again to redo its select stage")
            target = out / "adapters" / f"{row['variant']}-round-{round_}"
            atomic_copy_tree(source, target)
            atomic_write_text(_model_card(recorded, row), target / "README.md")
            done.adapters.append(target)
    dataset = out / "dataset"
    feedback = [pl.read_parquet(run.round_feedback(r)) for r in run.rounds() if run.round_feedback(r).is_file()]
    if feedback:
        labels = pl.concat(feedback, how="diagonal_relaxed").unique(["kind", "game_turn_id"], keep="last",
                                                                    maintain_order=True)
        for (kind,), rows in sorted(labels.partition_by("kind", as_dict=True).items()):
            path = dataset / f"feedback_decoder_{kind}" / "train.parquet"
            atomic_write_parquet(rows.select("game_turn_id", "round", "policy", predictions=pl.col("label")), path)
            done.configs[f"feedback_decoder_{kind}"] = path
    games = [run.deployed(r) for r in run.rounds() if run.deployed(r).is_file()]
    logs = [Path(p) for p in recorded.get("data", {}).get("interactions", [])]
    games += [p for p in logs if p.is_file() and p.suffix == ".parquet"]
    if games:
        path = dataset / "interaction" / "train.parquet"
        atomic_write_parquet(pl.concat([pl.read_parquet(p) for p in games], how="diagonal_relaxed")
                             .unique("game_id", keep="first", maintain_order=True), path)
        done.configs["interaction"] = path
    if not done.adapters and not done.configs:
        raise ExportError(f"{run.root}: no selected adapter, decoded feedback or games to export yet")
    if done.configs:
        atomic_write_text(_dataset_card(recorded.get("experiment", root.name), done.configs, dataset),
                          dataset / "README.md")
    return done
