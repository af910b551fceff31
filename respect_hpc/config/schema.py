"""The round manifest's schema: the sections that name a round's data, model, variants, seeds and cluster.

pydantic models with the defaults of the paper and the official code; loading.py reads a YAML file into
them. Strings that reach a scheduler (partition, account, QOS, constraint, names) must match a conservative
pattern, so nothing from a manifest reaches a shell unvalidated.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from respect_hpc.core.rundir import RunDir
from respect_hpc.core.text import clip
from respect_hpc.domain.multiref import DEFAULT_MAX_TURNS
from respect_hpc.domain.policies import CONTROL_POLICY, SEED_POLICY
from respect_hpc.domain.prompts import (
    DECODER_TEMPLATES,
    DEFAULT_DECODER_TEMPLATE,
    DEFAULT_POLICY_TEMPLATE,
    POLICY_TEMPLATES,
)

Objective = Literal["fft", "rl", "kto", "seed"]  # seed: the seed round's policy, on D_0 alone
FeedbackKind = Literal["binary", "ternary"]
Stage = Literal["ingest", "decode", "merge", "train", "select", "deploy", "collect", "metrics"]

_SAFE = "letters, digits, '_', '.', '-'"
_SAFE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _safe(value: str) -> str:
    if not value or not set(value) <= _SAFE_CHARS or value[0] in "-.":
        raise ValueError(f"unsafe value {clip(value)}: expected {_SAFE}, not starting with '-' or '.'")
    return value


def _plain_path(value: Path) -> Path:
    """A path without control characters (a newline would reach an sbatch script as a new directive)."""
    bad = sorted({repr(c) for c in str(value) if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(f"path {clip(str(value))} holds control characters {', '.join(bad)}")
    return value


def _safe_constraint(value: str) -> str:
    # SLURM constraint expressions also use '&', '|', ',' and '*' between feature names.
    if not value or not set(value) <= _SAFE_CHARS | set("&|,*") or value.startswith("-"):
        raise ValueError(f"unsafe value {clip(value)}: expected feature names ({_SAFE}) joined by '&', '|' or ','")
    return value


def _setup_line(value: str) -> str:
    """A shell line run before each task (module load, export): one line, printable, bounded."""
    bad = sorted({repr(c) for c in value if (ord(c) < 32 and c != "\t") or ord(c) == 127})
    if bad:
        raise ValueError(f"setup line {clip(value)} holds control characters {', '.join(bad)}: one shell line each")
    if not value.strip() or len(value) > 1000:
        raise ValueError("expected a shell line of 1 to 1000 characters")
    return value


# sbatch options a manifest may add (cluster.additional_parameters), with what their values may hold; the
# options respect-hpc sets itself (time, partition, resources, array, output, signal) are not among them
SBATCH_VALUE_CHARS = _SAFE_CHARS | set(",:=@%+/[]|&*")
SBATCH_OPTIONS = frozenset({
    "begin", "chdir", "comment", "cores_per_socket", "cpu_freq", "deadline", "distribution", "exclude",
    "exclusive", "export", "get_user_env", "gpu_bind", "gpu_freq", "gres", "gres_flags", "hint", "licenses",
    "mem_bind", "mem_per_cpu", "mem_per_gpu", "mincpus", "network", "nice", "nodelist", "no_requeue",
    "overcommit", "oversubscribe", "power", "prefer", "priority", "profile", "propagate", "reservation",
    "sockets_per_node", "spread_job", "switches", "thread_spec", "threads_per_core", "tmp", "uid", "umask",
    "wait_all_nodes", "wckey",
})
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")


def _sbatch_options(value: dict[str, object]) -> dict[str, object]:
    for name, option in value.items():
        if name not in SBATCH_OPTIONS:
            close = difflib.get_close_matches(name, sorted(SBATCH_OPTIONS), n=1)
            raise ValueError(f"unknown sbatch option {clip(name)}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + ": expected one of the options respect-hpc does not set itself (README: cluster)")
        text = str(option)
        if isinstance(option, bool):
            if not option:
                raise ValueError(f"{name}: false: leave the option out instead")
        elif not text or not set(text) <= SBATCH_VALUE_CHARS or text.startswith("-") or len(text) > 200:
            raise ValueError(f"{name}: unsafe value {clip(text)}: expected letters, digits and _ . - , : = @ % + / "
                             "[ ] | & *, not starting with '-'")
    return value


MAX_ROUND = 10_000
MAX_NAME = 64  # characters of an experiment or variant name (folder names: a file system allows 255)
MAX_TASK_FOLDER = 200  # characters of a training task's folder name, <variant>@<sweep cell>
MAX_TASKS = 10_000  # training tasks of one round (variants x sweep cells x seeds)
SafeName = Annotated[str, AfterValidator(_safe)]
ShortName = Annotated[SafeName, Field(max_length=MAX_NAME)]  # names folders of the run directory
@dataclass(frozen=True)
class PathKind:
    """What a path field must name when the manifest is checked: ``any`` existing file or folder, a ``file``,
    a ``folder`` (holding ``inside`` where given), or an ``output`` that is made (never checked). Every path
    field is resolved against the manifest's folder; loading.py finds them by walking the schema."""

    kind: str
    inside: str | None = None


PlainPath = Annotated[Path, AfterValidator(_plain_path)]
InputPath = Annotated[PlainPath, PathKind("any")]
InputFile = Annotated[PlainPath, PathKind("file")]
InputFolder = Annotated[PlainPath, PathKind("folder")]
OutputPath = Annotated[PlainPath, PathKind("output")]
MAX_SEED = 2**31 - 1
MAX_SHARDS = 100_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        """YAML's true/false is not a number (pydantic alone would read `shards: true` as 1)."""
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            kinds = (annotation, *get_args(annotation))
            if bool not in kinds:
                what = next((name for kind, name in ((int, "an integer"), (float, "a number"), (str, "a string"))
                             if kind in kinds), "a value of the field's own kind")
                raise ValueError(f"expected {what}, got {str(value).lower()}")
        return value


class DataSection(Strict):
    interactions: list[InputPath] = Field(default_factory=list, description=(
        "interaction logs of the rounds so far (Parquet or JSON lines, public layout; files or folders); none: "
        "the seed round (round 0), which trains the seed policy on D_0 alone"))
    seed_data: InputPath | None = Field(None, description="D_0: successful human-human turns used as rehearsal")
    propensity: Literal["logged", "recompute"] = Field(
        "logged", description="p, the probability the deployed policy gave each action: as logged, or "
                              "recomputed where the logs lack it (the ingest stage; needs deployed)")
    deployed: dict[SafeName, InputFolder] = Field(
        default_factory=dict, description="the adapter of each deployed policy, by the name the logs give it "
                                          "(policy_name): what p is recomputed under")
    seed_turns: InputFile | None = Field(None, description=(
        "a text file of D_0 turn ids (game_turn_id, one a line) to rehearse, the rest of seed_data left out; an "
        "augmented turn is kept when its source turn is listed (the official runs list 102 turns of 25 games)"))
    validation: InputPath | None = Field(None, description="human-human validation games for checkpoint selection")
    images: InputFolder | None = Field(None, description="folder of the tangram PNGs named in the logs")
    max_turns: int = Field(DEFAULT_MAX_TURNS, ge=1, le=26, description="turn limit of a game")


class ModelSection(Strict):
    path: InputPath = Field(description="local folder of a transformers checkpoint (or of a GGUF file)")
    gguf_file: SafeName | None = Field(None, description="GGUF file name inside path, when the model is one")
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    image_size: int = Field(224, ge=14, le=4096, description="edge in pixels images are resized to (official: 224, "
                            "whatever the checkpoint's processor says)")
    image_splitting: bool = Field(False, description="split each image into 4 crops plus the whole (IDEFICS2's "
                                  "do_image_splitting; official: false)")
    attention: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="attention kernels: sdpa (PyTorch's, on every machine), flash_attention_2 (the official "
                            "runs; needs the flash-attn package, a CUDA GPU and bf16 or fp16), eager")

    @model_validator(mode="after")
    def _flash_attention_in_half_precision(self) -> ModelSection:
        if self.attention == "flash_attention_2" and self.dtype == "fp32":
            raise ValueError("attention flash_attention_2 runs in bf16 or fp16, not dtype fp32: set model.dtype, or "
                             "attention: sdpa")
        return self


class DecoderSection(Strict):
    model: ModelSection | None = Field(None, description="decoder model; default: the round's base model")
    templates: dict[FeedbackKind, str] = Field(default_factory=lambda: dict(DEFAULT_DECODER_TEMPLATE))
    shards: int = Field(1, ge=1, le=MAX_SHARDS, description="array tasks that decoding is split into")
    batch_tokens: int | None = Field(None, ge=64, description="token budget of one scoring batch; unset: 8192 on "
                                     "a CPU, sized to the free memory on a GPU (the first batch measures it)")
    chunk_rows: int = Field(4096, ge=1, description="windows scored and streamed to disk at a time")
    labels: dict[FeedbackKind, InputFile] = Field(
        default_factory=dict, description="decoded labels to use instead of decoding that kind: a Parquet or "
                                          "JSON-lines file in the public feedback_decoder_binary/ternary layout "
                                          "(game_turn_id, predictions -1/0/1), e.g. the paper's own")

    @field_validator("templates")
    @classmethod
    def _known_templates(cls, value: dict[str, str]) -> dict[str, str]:
        for kind, key in value.items():
            template = DECODER_TEMPLATES.get(key)
            if template is None:
                raise ValueError(f"unknown template {clip(key)}: expected one of {', '.join(sorted(DECODER_TEMPLATES))}")
            if template.kind != kind:
                raise ValueError(f"template {key!r} is {template.kind}, not {kind}")
        return {**DEFAULT_DECODER_TEMPLATE, **value}


class Hyperparameters(Strict):
    """Training hyperparameters of one objective; defaults are RESPECT.md Table 1."""

    optimizer: Literal["adamw", "rmsprop", "paged_adamw_8bit"] = Field(
        "adamw", description="paged_adamw_8bit (the official FFT/RL runs) needs bitsandbytes and a CUDA device")
    learning_rate: float = Field(1e-4, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: int = Field(20, ge=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    effective_batch: int = Field(64, ge=1, description="trained actions per optimizer step (with game packing: "
                                                        "about, a game's sequence holding several)")
    micro_batch: int = Field(4, ge=1, description="sequences per device per forward pass: one turn each, or with "
                                                 "game packing one game each (no longer than its last turn's)")
    entropy_weight: float = Field(0.01, ge=0, lt=1, description=(
        "e of the entropy term: loss (1 - e) objective + e |R| U, U the cross-entropy against the uniform "
        "distribution (the official code's structure); Table 1: 0.01 FFT and RL, 0.1 KTO (the official gin "
        "files: 0.1 and 0.01)"))
    temperature: float = Field(1.0, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="of D_0's cross-entropy, its own task in every "
                                                                "variant (official: 0.1)")
    beta: float = Field(0.5, gt=0, description="KTO")
    lambda_desirable: float = Field(4.0, gt=0, description="KTO weight of desirable actions (Table 1: 4 until "
                                                           "round 3; the official code: 1)")
    lambda_undesirable: float = Field(1.0, gt=0, description="KTO weight of undesirable actions")
    kto_length_normalised: bool = Field(False, description=(
        "KTO only: divide the log-ratio r, and each term of the reference point z, by the action's tokens (the "
        "paper's text: 'length normalisation' for all three objectives); false: the sums, as the official code "
        "(both presets: Table 1's KTO values were tuned with the code)"))
    negatives: Literal["per_epoch", "all"] = Field(
        "per_epoch", description="RL and KTO negatives: per_epoch, a subsample of negatives_per_5_positives per 5 "
                                 "positives drawn afresh each epoch (seeded by seed and epoch; the paper); all, no "
                                 "subsampling (the official code, task weighting off)")
    negatives_per_5_positives: float = Field(4.0, gt=0, description="the subsample's ratio (negatives: per_epoch)")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(8, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_placement: Literal["official", "paper", "enhanced"] = Field(
        "official", description="official: q, k, v, o, gate, up, down projections of the text model, the modality "
                                "projection and the perceiver (multitask.gin); paper: the same without o_proj; "
                                "enhanced: paper's and the vision model's out_proj, fc1, fc2")
    lora_init: Literal["gaussian", "default"] = Field(
        "gaussian", description="A's initialisation: gaussian, N(0, 1/r) (the official runs); default, PEFT's "
                                "Kaiming-uniform (B starts at zero either way)")

    @model_validator(mode="after")
    def _whole_micro_batches(self) -> Hyperparameters:
        if self.effective_batch % self.micro_batch:
            raise ValueError(f"effective_batch {self.effective_batch} is not a multiple of micro_batch "
                             f"{self.micro_batch}")
        return self


OBJECTIVE_DEFAULTS: dict[str, dict] = {
    "fft": {},
    "rl": {},
    "kto": {"optimizer": "rmsprop", "learning_rate": 1e-5, "schedule": "constant", "entropy_weight": 0.1},
    "seed": {"schedule": "constant", "warmup_steps": 0, "epochs": 40},  # the official seed configuration
}


# Where RESPECT.md's Table 1 (and text) and the official gin files disagree: the values of `preset: code`
# (`preset: paper` is OBJECTIVE_DEFAULTS as they are). Sources: multitask.gin (XTrainingArguments.optim,
# IglConfig.label_smoothing, MultiTaskConfig.enable_weighted_task_batch) and kto.gin (IglConfig.label_smoothing;
# KTO's lambdas are the loss's defaults, 1 and 1).
CODE_PRESET: dict[str, dict] = {
    "fft": {"entropy_weight": 0.1, "optimizer": "paged_adamw_8bit", "negatives": "all"},
    "rl": {"entropy_weight": 0.1, "optimizer": "paged_adamw_8bit", "negatives": "all"},
    "kto": {"entropy_weight": 0.01, "lambda_desirable": 1.0, "negatives": "all"},
    "seed": {"optimizer": "paged_adamw_8bit"},
}
PRESETS = {"paper": {name: {} for name in CODE_PRESET}, "code": CODE_PRESET}


class TrainingSection(Strict):
    """Per-objective hyperparameters; a manifest gives only what differs from its preset."""

    preset: Literal["paper", "code"] = Field(
        "paper", description="one switch between the paper's values (Table 1: entropy weights 0.01 FFT/RL and "
                             "0.1 KTO, lambda_desirable 4, AdamW, negatives subsampled per epoch) and the official "
                             "code's (0.1 and 0.01, lambda_desirable 1, paged AdamW 8-bit for FFT/RL, every "
                             "negative); each value is still overridable")
    fft: Hyperparameters = Field(default_factory=dict, validate_default=True)
    rl: Hyperparameters = Field(default_factory=dict, validate_default=True)
    kto: Hyperparameters = Field(default_factory=dict, validate_default=True)
    seed: Hyperparameters = Field(default_factory=dict, validate_default=True,
                                  description="the seed round's policy (D_0 alone, label-smoothed cross-entropy)")
    zero_stage: int | None = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage; null: plain Accelerate "
                                                              "(no DeepSpeed)")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints besides each "
                                                       "epoch's end; 0: at epoch ends only")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass "
                                                            "(less memory, about a third more compute)")
    packing: Literal["game", "turn"] = Field(
        "game", description="game: the trained turns of one game are one sequence (each turn's prompt and answer "
                            "start the next turn's prompt; one image order per game and epoch); turn: one "
                            "sequence per trained turn (its own image order), as the official code batches")
    image_order: Literal["shuffled", "logged"] = Field(
        "shuffled", description="shuffled: each trained example's images in an order drawn per seed, epoch and "
                                "example (game, with packing), letters renamed, as the official code; logged: the "
                                "order the listener saw (a simulated world whose letters always name the same "
                                "tangrams, simulation.order: fixed)")
    vision_cache: bool = Field(
        True, description="compute the frozen vision model's output once per image and reuse it across epochs, "
                          "seeds, variants and validation (on disk in the round folder); off by itself where the "
                          "LoRA placement trains the vision model (enhanced)")
    prefetch: bool | None = Field(None, description=(
        "build each micro-batch (tokens, pixels) in a worker thread while the one before it runs, off the GPU's "
        "critical path; the same batches. Default: on a GPU only (on a CPU the worker competes with the model "
        "for the same cores)"))
    d0_augmentation: Literal["official", "corrected", "paper", "none"] = Field(
        "official", description="synthetic deselection turns added to D_0: official (two kinds, 'remove the "
                                "last selection' and 'remove the current selection', mixed 0.88 / 0.06 / 0.06; a "
                                "'remove the last selection' turn's state line shows the selection before its "
                                "source turn, as the official augmentation writes it), corrected (the same, that "
                                "state line showing the selection after the source turn), paper (one 'Wrong, undo "
                                "what you selected' turn per 12), or none")
    d0_augmentation_seed: int = Field(42, ge=0, le=MAX_SEED, description=(
        "seed of D_0's augmentation draw (official: 42), the same for every task: each seed of each variant "
        "rehearses the same D_0"))

    @field_validator("fft", "rl", "kto", "seed", mode="before")
    @classmethod
    def _over_defaults(cls, value: object, info: ValidationInfo) -> object:
        preset = PRESETS.get(info.data.get("preset"), PRESETS["paper"])[info.field_name]
        return {**OBJECTIVE_DEFAULTS[info.field_name], **preset, **value} if isinstance(value, dict) else value

    def in_force(self, objective: str, hp: Hyperparameters | None = None) -> str:
        """The preset and the values it decides for ``objective`` as they are in force in ``hp`` (default: the
        section's; a manifest or a sweep cell may override any): for the plan and a training task's first lines."""
        hp = hp or getattr(self, objective)
        decided = ("entropy_weight", "optimizer", "negatives", *(("lambda_desirable",) if objective == "kto" else ()))
        return f"preset {self.preset}: " + ", ".join(f"{name} {getattr(hp, name)}" for name in decided)


class TrackingSection(Strict):
    """Experiment tracking through Accelerate's trackers (main process only)."""

    backend: Literal["none", "tensorboard", "wandb", "mlflow", "trackio"] = Field(
        "none", description="where training losses, learning rate, gradient norm, throughput, peak memory and "
                            "validation go, and decode's label counts")
    project: SafeName | None = Field(None, description="the tracker's project (default: the experiment)")
    online: bool = Field(False, description="send to the backend's server; false: files under the run directory "
                                            "(compute nodes often have no network), synced later")


class ValidationSection(Strict):
    """How checkpoints are scored on the human-human validation turns (the official settings by default)."""

    decoding: Literal["sample", "greedy"] = Field(
        "sample", description="sample at temperature 1 over the legal action tokens (official), or greedy")
    constrained: bool | None = Field(
        None, description="decode only legal actions (the official KTO runs); default: for KTO variants only")
    constraint: Literal["official", "state_aware"] = Field(
        "official", description="what a constrained action may be: official, any well-formed action whatever the "
                                "state (the official regex: deselect and select any letter); state_aware, only "
                                "deselecting selected images and selecting the others")
    turns: int = Field(390, ge=1, description="at most this many validation turns (a seeded draw of the good ones)")
    max_new_tokens: int = Field(10, ge=1, description="token limit of a generated action")


class Variant(Strict):
    name: ShortName
    feedback: FeedbackKind
    objective: Objective
    init: Literal["base", "previous"] | None = Field(
        None, description="train from the base model (default for fft, rl) or continue from the "
                          "previous round's selected adapter (default for kto)")
    previous_adapter: InputFolder | None = Field(None, description="default: the previous round's policies/<name>")
    policies: list[SafeName] | None = Field(
        None, min_length=1, description="the lineage: logged policies (as the logs name them) whose turns this "
                                        "variant trains on, e.g. [sft, bp] (the round-0 policy and the variant's "
                                        "own deployments); default: every logged policy")

    @property
    def continues(self) -> bool:
        return (self.init or ("previous" if self.objective == "kto" else "base")) == "previous"


# Round 0, the seed round: the initial policy, trained on D_0 alone and named as the public logs name it.
SEED_VARIANT = Variant(name=SEED_POLICY, feedback="binary", objective="seed", init="base")

# The paper's six systems, each retrained on the round-0 policy's games and its own deployments, with the
# policy names of the public logs (b/t = binary/ternary decoder; p/a/k = FFT/RL/KTO).
PAPER_VARIANTS = [Variant(name=f"{f[0]}-{o}", feedback=f, objective=o, policies=["sft", f"{f[0]}{code}"])
                  for o, code in (("fft", "p"), ("rl", "a"), ("kto", "k")) for f in ("binary", "ternary")]


class SimulationSection(Strict):
    """A simulated deployment after selection (simulator.py): the round's selected policies play games with
    a simulated speaker on the KiloGram tangrams, logged as the public interaction layout with p."""

    kilogram: Annotated[PlainPath, PathKind("folder", inside="dense.json")] = Field(description="the KiloGram folder: dense.json (about 50 human descriptions of 74 "
                                            "tangrams) and tangram_pngs/ (data.images must name it)")
    games: int = Field(100, ge=1, le=1_000_000, description="simulated games each deployed policy plays")
    shards: int = Field(1, ge=1, le=MAX_SHARDS, description="array tasks the games are split into")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="games (images, targets, speaker) and sampling")
    control: bool = Field(True, description="also deploy the seed policy, never retrained, as policy 'control'")
    control_games: int | None = Field(None, ge=1, le=1_000_000,
                                      description="games the seed policy plays wherever it is deployed, round "
                                                  "0 and the control (default: games): every round is read "
                                                  "against it, so more games narrow the baseline's noise; "
                                                  "round 1 trains on all of round 0's games")
    implicit: float = Field(0.3, ge=0, le=1, description="reactions without an approval or rejection word")
    misleading: float = Field(0.05, ge=0, le=1, description="reactions that say the opposite of the truth")
    silent: float = Field(0.05, ge=0, le=1, description="reactions that say nothing useful")
    undo: float = Field(0.35, ge=0, le=1, description="after a wrong selection, asks to undo it")
    credit: Literal["target", "asked"] = Field(
        "target", description="the selections the speaker approves: any target (the game's truth), or only "
                              "the tangram it asked for (a speaker who means one tangram corrects another)")
    pool: Literal["seed", "deploy", "all"] = Field(
        "deploy", description="each tangram's descriptions used: seed (even-numbered), deploy (odd-numbered, "
                              "held out from the seed half), all")
    max_turns: int = Field(10, ge=1, le=26, description="turn limit of a simulated game (at most data.max_turns)")
    tangrams: int = Field(74, ge=10, description="the first N tangrams by name are in play (a game shows 10)")
    descriptions: int | None = Field(None, ge=2, description="each tangram's first N human descriptions are "
                                                             "spoken, split into the two halves (default: all, "
                                                             "about 50)")
    order: Literal["shuffled", "fixed"] = Field(
        "shuffled", description="the listener's image order: drawn per game, or fixed (the tangrams' name order; "
                                "with 10 tangrams in play a letter then always names the same tangram)")
    teach_steps: int = Field(0, ge=0, description="steps of full fine-tuning that teach a policy base built by "
                                                   "`loop` the listener's task on the seed half of the "
                                                   "descriptions (0: the base keeps random weights)")
    decoder_steps: int = Field(1000, ge=1, description="steps of full fine-tuning that teach a decoder built by "
                                                       "`loop` the decoder's answers (fewer can leave it calling "
                                                       "most rejections positive)")
    decoding: Literal["official", "constrained"] = Field(
        "official", description="official, as the official bots deploy: the legal tokens only (FFT and RL "
                                "variants, the seed policy) or the official state-agnostic regex (KTO), an "
                                "unparseable or empty action clicks the first image, p the probability of the "
                                "sampled tokens under the full vocabulary (the fallback click's p scored by a "
                                "teacher-forced pass, as the official annotation recomputes it); constrained, "
                                "every policy only legal actions of each state, p over the allowed tokens")
    batch: int = Field(8, ge=1, description="games generated at once")

    def speaker_settings(self, pool: str | None = None):
        """The simulated speaker these knobs describe (:class:`~respect_hpc.domain.simulator.SpeakerSettings`), speaking
        from ``pool`` where given (D_0 and validation: the seed half) instead of ``self.pool``."""
        from dataclasses import fields

        from respect_hpc.domain.simulator import SpeakerSettings

        knobs = self.model_dump(include={f.name for f in fields(SpeakerSettings)})
        return SpeakerSettings(**{**knobs, "pool": pool or self.pool})


class StageResources(Strict):
    gpus: int = Field(0, ge=0, description="GPUs per task")
    cpus: int = Field(1, ge=1, description="CPUs per process of a task (sbatch --cpus-per-task)")
    mem_gb: int = Field(4, ge=1)
    time_min: int = Field(60, ge=1, description="time limit of one task in minutes")
    nodes: int = Field(1, ge=1)
    max_parallel: int | None = Field(None, ge=1, description="array tasks running at once")
    tasks_per_node: int | None = Field(None, ge=1, description="processes per node of one task; default: one "
                                                               "per GPU, or 1 without GPUs")

    @property
    def processes(self) -> int:
        return self.tasks_per_node or max(self.gpus, 1)


def _default_stages() -> dict[str, StageResources]:
    return {stage: StageResources() for stage in get_args(Stage)}


class MailSection(Strict):
    user: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+-]+(@[A-Za-z0-9.-]+)?$", max_length=200)]
    types: list[Literal[MAIL_TYPES]] = Field(["FAIL"], min_length=1, description="Slurm's --mail-type events")


class ClusterSection(Strict):
    executor: Literal["local", "slurm", "debug"] = "local"
    partition: SafeName | None = None
    account: SafeName | None = None
    qos: SafeName | None = None
    constraint: Annotated[str, AfterValidator(_safe_constraint)] | None = None
    setup: list[Annotated[str, AfterValidator(_setup_line)]] = Field(
        default_factory=list, max_length=64, description="shell lines run before each Slurm task (module loads, "
                                                         "exports, a virtual environment's activation)")
    additional_parameters: Annotated[dict[str, str | int | bool], AfterValidator(_sbatch_options)] = Field(
        default_factory=dict, description="further sbatch options, by name with underscores (reservation, gres, "
                                          "exclude, ...), those respect-hpc sets itself excluded")
    mail: MailSection | None = Field(None, description="mail from Slurm: user and event types (default FAIL)")
    stages: dict[Stage, StageResources] = Field(default_factory=_default_stages)

    @field_validator("stages")
    @classmethod
    def _fill_stages(cls, value: dict[str, StageResources]) -> dict[str, StageResources]:
        return {**_default_stages(), **value}


class Manifest(Strict):
    experiment: ShortName
    round: int = Field(ge=0, le=MAX_ROUND)
    workdir: OutputPath = Field(Path("runs"), description="where run directories are created (relative to the "
                                                         "manifest's folder, like every path in it)")
    data: DataSection
    model: ModelSection
    policy_template: str = DEFAULT_POLICY_TEMPLATE
    decoder: DecoderSection = DecoderSection()
    variants: list[Variant] = Field(default_factory=lambda: list(PAPER_VARIANTS), min_length=1)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    training: TrainingSection = TrainingSection()
    validation: ValidationSection = ValidationSection()
    tracking: TrackingSection = TrackingSection()
    sweep: dict[str, list[float | int | str]] = Field(
        default_factory=dict, description="a grid on top of the seeds: hyperparameter -> values, e.g. "
                                          "{learning_rate: [1e-4, 3e-4], lora_r: [8, 16]}; every cell trains "
                                          "every variant and seed")
    cluster: ClusterSection = ClusterSection()
    simulation: SimulationSection | None = Field(
        None, description="deploy the selected policies to a simulated speaker after selection (the deploy stage)")

    @model_validator(mode="before")
    @classmethod
    def _seed_round_variant(cls, data: object) -> object:
        """Without interaction logs the round trains the seed policy alone."""
        if isinstance(data, dict) and isinstance(data.get("data"), dict) and not data["data"].get("interactions") \
                and "variants" not in data:
            return {**data, "variants": [SEED_VARIANT]}
        return data

    @model_validator(mode="after")
    def _seed_round(self) -> Manifest:
        seeding = [v.name for v in self.variants if v.objective == "seed"]
        if self.data.interactions and seeding:
            raise ValueError(f"variants: objective seed ({', '.join(seeding)}) belongs to the seed round, a "
                             "manifest without data.interactions")
        if self.data.interactions and self.round == 0:
            raise ValueError("data.interactions: round 0 is the seed round, before any deployment: it has no logs "
                             "(the logs of round R are read by round R + 1); set round, or leave the logs out")
        if not self.data.interactions:
            if self.round != 0:
                raise ValueError(f"data.interactions: round {self.round} needs the interaction logs of the rounds "
                                 "so far; only round 0, the seed round, trains without them")
            if self.variants != [SEED_VARIANT]:
                raise ValueError("variants: the seed round (no data.interactions) trains the seed policy alone; "
                                 "leave variants out")
            if self.data.seed_data is None:
                raise ValueError("data.seed_data: the seed round trains on D_0: name it")
        return self

    @property
    def seed_round(self) -> bool:
        """Round 0 without logs: the seed policy is trained on D_0 and becomes every variant's start."""
        return not self.data.interactions

    @field_validator("sweep")
    @classmethod
    def _sweep_fields(cls, value: dict[str, list]) -> dict[str, list]:
        for key, values in value.items():
            if key not in Hyperparameters.model_fields:
                raise ValueError(f"sweep.{key}: not a training hyperparameter; expected one of "
                                 f"{', '.join(Hyperparameters.model_fields)}")
            if not values:
                raise ValueError(f"sweep.{key}: no values")
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"sweep.{key}: values repeat ({', '.join(repeated)}): a cell would train twice")
            for v in values:
                Hyperparameters.model_validate({key: v})
        return value

    @model_validator(mode="after")
    def _bounded_tasks(self) -> Manifest:
        """A round's training tasks are bounded (a 10 x 10 sweep would be 10^10 cells), and each task's folder
        name fits the file system."""
        cells = 1
        for values in self.sweep.values():
            cells *= len(values)
        tasks = len(self.variants) * cells * len(self.seeds)
        if tasks > MAX_TASKS:
            raise ValueError(f"sweep: {len(self.variants)} variants x {cells:,} cells x {len(self.seeds)} seeds make "
                             f"{tasks:,} training tasks, more than the limit of {MAX_TASKS:,}")
        longest = max((len(f"{v.name}@{cell}") for v in self.variants for cell in self.cells()), default=0)
        if longest > MAX_TASK_FOLDER:
            raise ValueError(f"sweep: a training task's folder name (<variant>@<cell>) would be {longest} characters, "
                             f"more than {MAX_TASK_FOLDER}: shorten the variant names or sweep values")
        return self

    def training_tasks(self) -> list[tuple[str, str, int]]:
        """Every training task of the round: (variant, sweep cell, seed)."""
        return [(v.name, cell, seed) for v in self.variants for cell in self.cells() for seed in self.seeds]

    def cells(self) -> dict[str, dict]:
        """The sweep's cells by name (``lora_r-16_learning_rate-0.0003``), or the one cell ``default``."""
        if not self.sweep:
            return {"default": {}}
        keys = sorted(self.sweep)
        return {"_".join(f"{k}-{v}" for k, v in zip(keys, values)): dict(zip(keys, values))
                for values in itertools.product(*(self.sweep[k] for k in keys))}

    @field_validator("policy_template")
    @classmethod
    def _known_policy_template(cls, value: str) -> str:
        if value not in POLICY_TEMPLATES:
            raise ValueError(f"unknown template {clip(value)}: expected one of {', '.join(sorted(POLICY_TEMPLATES))}")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        return value

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, value: list[Variant], info: ValidationInfo) -> list[Variant]:
        names = [v.name.lower() for v in value]  # names folders: some file systems ignore case
        repeated = sorted({v.name for v in value if names.count(v.name.lower()) > 1})
        if repeated:
            raise ValueError(f"variant names repeat (letter case aside, as folder names on some file systems): "
                             f"{', '.join(repeated)}")
        for variant in value:
            if variant.continues and info.data.get("round") == 0 and variant.previous_adapter is None:
                raise ValueError(f"variant {variant.name} continues from the previous round, "
                                 "but round 0 has none: set init: base or previous_adapter")
        return value

    @field_validator("simulation")
    @classmethod
    def _simulated_turns(cls, value: SimulationSection | None, info: ValidationInfo) -> SimulationSection | None:
        data = info.data.get("data")
        if value is not None and data is not None and value.max_turns > data.max_turns:
            raise ValueError(f"max_turns {value.max_turns} is more than data.max_turns {data.max_turns}, the turn "
                             "limit the round's ingest holds the deployed games to: raise data.max_turns")
        return value

    @property
    def run_dir(self) -> RunDir:
        """Where the round's outputs go: ``<workdir>/<experiment>``."""
        return RunDir(self.workdir / self.experiment)

    def previous_adapter(self, variant: Variant) -> Path:
        """What a continuing variant starts from: its ``previous_adapter``, else its policy of the round before;
        in round 1, the seed policy every variant starts from."""
        if variant.previous_adapter is not None:
            return variant.previous_adapter
        return self.run_dir.policy(self.round - 1, SEED_POLICY if self.round == 1 else variant.name)

    def deployed_policies(self) -> dict[str, Path]:
        """A simulated deployment's policies, name -> adapter: each variant's selected policy of this round,
        and the control (the seed policy, never retrained) after the seed round."""
        run = self.run_dir
        policies = {v.name: run.policy(self.round, v.name) for v in self.variants}
        if self.simulation is not None and self.simulation.control and not self.seed_round:
            policies[CONTROL_POLICY] = run.policy(0, SEED_POLICY)
        return policies

    def collecting_adapter(self, policy: str, round_: int) -> Path:
        """The adapter that logged ``policy``'s games of round ``round_`` (KTO's reference): the one
        ``data.deployed`` names for it, else what this run directory deployed (the round's selected policy; the
        seed policy for the control)."""
        if policy in self.data.deployed:
            return self.data.deployed[policy]
        if policy == CONTROL_POLICY:
            return self.run_dir.policy(0, SEED_POLICY)
        return self.run_dir.policy(round_, policy)

    def games_played(self, policy: str) -> int:
        """Simulated games ``policy`` plays: the seed policy (round 0's deployment, then the control every
        round) ``control_games``, the round's selected policies ``games``."""
        sim = self.simulation
        seed_policy = policy == CONTROL_POLICY or (self.seed_round and policy == SEED_POLICY)
        return (sim.control_games or sim.games) if seed_policy else sim.games

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def decoder_model(self) -> ModelSection:
        """The feedback decoder: the original base model unless the manifest names another."""
        return self.decoder.model or self.model

    @property
    def feedback_kinds(self) -> list[str]:
        """The feedback kinds the variants train on, in order."""
        return sorted({v.feedback for v in self.variants})

    def objective(self, variant: Variant, cell: str = "default") -> Hyperparameters:
        """A variant's hyperparameters in a sweep cell."""
        hp = getattr(self.training, variant.objective)
        return Hyperparameters.model_validate({**hp.model_dump(), **self.cells()[cell]}) if cell != "default" else hp

    def content_hash(self) -> str:
        """Hash of the resolved manifest: equal for manifests that mean the same round."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
