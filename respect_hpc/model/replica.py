"""Tiny random-weight replicas of real checkpoints: the real interface at a size a CPU runs in seconds.

A replica keeps everything a model shows to the code around it (tokenizer,
special-token ids, chat template, processor settings, generation settings, the
architecture family, vocabulary and image-token layout) and scales down only the
widths and depths, with fresh random weights saved as safetensors. Tests, the
demo and a dry run on a login node then meet the same prompts, token ids and
image-token counts as the model a manifest will train.

- :func:`replica_from` scales down any local checkpoint folder (its tokenizer,
  processor and template files are copied as they are).
- :func:`write_interface` writes the interface of a known model without weights, as
  its family rebuilds it offline (model/families/: ``idefics2-8b`` from the Mistral
  v1 SentencePiece model that the ``mistral-common`` wheel ships, IDEFICS2-8B's
  special tokens, chat template, processor and generation configs;
  ``idefics2-8b-text``, its Mistral-7B language model as a causal LM).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from respect_hpc.core.errors import RespectError
from respect_hpc.model.families import family_of, interface_family

# The widths and depths of a replica; every other setting is the source's.
TEXT_SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
VISION_SIZE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


class ReplicaError(RespectError, ValueError):
    """A source folder that cannot be scaled down, with what is missing."""


def write_interface(like: str, folder: str | Path) -> Path:
    """The full-size config, tokenizer, processor and generation config of a known model, without weights."""
    family = interface_family(like)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family.write_interface(like, folder)
    return folder


def text_size(hidden_size: int = 64, layers: int = 2) -> dict:
    """The text model's widths and depths of a replica (the defaults run in seconds on a CPU)."""
    return {**TEXT_SIZE, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": layers}


def vision_size(hidden_size: int = 32, layers: int = 2) -> dict:
    """The vision model's widths and depths of a replica (SigLIP's MLP is about 4x its width)."""
    return {**VISION_SIZE, "hidden_size": hidden_size, "intermediate_size": 4 * hidden_size if hidden_size > 32
            else VISION_SIZE["intermediate_size"], "num_hidden_layers": layers,
            "num_attention_heads": max(2, hidden_size // 64)}


def _scaled(section: dict, sizes: dict) -> dict:
    out = {**section, **{k: v for k, v in sizes.items() if k in section}}
    if "head_dim" in out:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out


def scaled_config(config: dict, text_sizes: dict = TEXT_SIZE, vision_sizes: dict = VISION_SIZE) -> dict:
    """A checkpoint's config.json with the replica's widths and depths."""
    if "text_config" in config:
        text = _scaled(config["text_config"], text_sizes)
        out = {**config, "text_config": text}
    elif any(k in config for k in TEXT_SIZE):  # the text model's settings at the top (a causal LM, Qwen2-VL)
        out = text = _scaled(config, text_sizes)
    else:
        raise ReplicaError("config.json names none of " + ", ".join(TEXT_SIZE) + ": cannot scale this model down")
    if "vision_config" in config:
        out["vision_config"] = _scaled(config["vision_config"], vision_sizes)
    family = family_of(config)
    for section, sizes in family.replica_sizes.items():  # e.g. IDEFICS2's perceiver
        if section in config:
            out[section] = {**_scaled(config[section], sizes), "hidden_size": text["hidden_size"]}
    if family.scale_config is not None:
        family.scale_config(out, text_sizes, vision_sizes)
    return out


def _set_image_tokens(config: dict, folder: Path, tokens: int, source: Path) -> None:
    """The family's image token count written into the replica's config and processor config (a processor's
    ``processor_config.json``, or an image processor's own ``preprocessor_config.json``)."""
    family = family_of(config)
    processor_file, images_file = folder / "processor_config.json", folder / "preprocessor_config.json"
    if family.set_image_tokens is None or not (processor_file.is_file() or images_file.is_file()):
        raise ReplicaError(f"image_tokens: the {family.name} family of '{source}' sets no image token count "
                           "(or the folder has no processor config)")
    if processor_file.is_file():
        processor = json.loads(processor_file.read_text())
        family.set_image_tokens(config, processor, tokens)
        processor_file.write_text(json.dumps(processor, indent=2))
    else:
        processor = {"image_processor": json.loads(images_file.read_text())}
        family.set_image_tokens(config, processor, tokens)
        images_file.write_text(json.dumps(processor["image_processor"], indent=2))


def replica_from(source: str | Path, folder: str | Path, *, seed: int = 0, hidden_size: int = 64,
                 layers: int = 2, vision: tuple[int, int] = (32, 2), image_tokens: int | None = None) -> Path:
    """A tiny random-weight copy of the checkpoint in ``source``: same interface files, scaled-down config
    (``hidden_size`` and ``layers`` size its text model, ``vision`` (width, depth) its vision model; the
    benchmarks use larger ones). ``image_tokens`` changes how many tokens the perceiver resampler gives an
    image (the config's latents and the processor's ``image_seq_len`` together; IDEFICS2-8B: 64), for a
    policy that must train many steps on a CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    source, folder = Path(source), Path(folder)
    if not (source / "config.json").is_file():
        raise ReplicaError(f"--from: '{source}' has no config.json (not a transformers checkpoint folder)")
    if source.resolve() == folder.resolve():
        raise ReplicaError(f"the replica folder '{folder}' is the source folder")
    config = scaled_config(json.loads((source / "config.json").read_text()), text_size(hidden_size, layers),
                           vision_size(*vision))
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHTS) and not path.name.endswith(".index.json") \
                and path.name != "config.json":
            shutil.copy(path, folder / path.name)
    if image_tokens is not None:
        _set_image_tokens(config, folder, image_tokens, source)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    loaded = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    cls = AutoModelForImageTextToText if family_of(config).multimodal else AutoModelForCausalLM
    model = cls.from_config(loaded, dtype=torch.float32)
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    model.save_pretrained(folder)
    return folder


def replica_like(like: str, folder: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                 vision: tuple[int, int] = (32, 2), image_tokens: int | None = None) -> Path:
    """A tiny random-weight model with the interface of ``like`` (see ``families.interfaces()``)."""
    with tempfile.TemporaryDirectory() as tmp:
        return replica_from(write_interface(like, tmp), folder, seed=seed, hidden_size=hidden_size, layers=layers,
                            vision=vision, image_tokens=image_tokens)
