"""Model families: what is specific to each kind of checkpoint, in one object the rest of the code asks.

A :class:`Family` names a checkpoint's image and end-of-turn tokens, the LoRA target modules of each
placement, where its vision tower lives (for the vision feature cache), how the manifest's image settings
map onto its processor, and how a tiny replica of it is scaled down. :func:`family_of` picks the family from
a checkpoint's ``config.json`` (its ``model_type``). A text-only causal LM (the feedback decoder, a text
policy) is the ``causal-lm`` family whatever its architecture.

Where a new family goes: a module here that builds its :class:`Family`, listed in :data:`FAMILIES`.
Nothing here imports torch or transformers: ``validate`` and ``--help`` stay light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from respect_hpc.core.errors import RespectError


class FamilyError(RespectError, ValueError):
    """A checkpoint of a family respect-hpc does not know."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]          # config.json's model_type values of the family
    multimodal: bool
    lora_targets: dict[str, str]          # LoRA placement -> regex of target module names (PEFT)
    end_of_turn: str | None = None        # the token that ends a chat message, where the tokenizer has one
    image_token: str | None = None        # the placeholder the processor expands into image tokens
    splits_images: bool = True            # whether model.image_splitting may be on
    vision_tower: str | None = None       # the last part of the frozen vision model's module name
    load_processor: Callable | None = None  # folder -> processor, where AutoProcessor is not the way
    configure_processor: Callable | None = None  # (processor, image_size, image_splitting) -> None
    image_tokens_per_crop: Callable | None = None  # processor -> tokens one crop becomes
    replica_sizes: dict[str, dict] = field(default_factory=dict)  # config section -> widths and depths
    interfaces: tuple[str, ...] = ()      # names `tiny-model --like` rebuilds offline
    write_interface: Callable | None = None  # (name, folder) -> None: config, tokenizer, processor, no weights
    set_image_tokens: Callable | None = None  # (config, processor config, tokens) -> None, for fast replicas
    image_text: Callable | None = None  # (processor, *layout) -> one image's expansion, where the processor
    #                                     expands images only when given them (None: it expands text alone);
    #                                     layout: the image's (rows, cols) of tiles, or its (t, h, w) patch grid
    grid_tokens: Callable | None = None  # (processor, (t, h, w)) -> tokens an image becomes, where the image
    #                                      processor gives flattened patches and a grid per image, not crops
    scale_config: Callable | None = None  # (config, text sizes, vision sizes) -> None: a replica's family-specific
    #                                       scaling, after the shared widths and depths


def families() -> list[Family]:
    """Every known family (imported here: the family modules import this one for :class:`Family`)."""
    from respect_hpc.model.families import causal_lm, idefics2, idefics3, qwen2_vl

    return [idefics2.FAMILY, idefics3.FAMILY, qwen2_vl.FAMILY, causal_lm.FAMILY]


def family_of(config: dict) -> Family:
    """The family of a checkpoint's config (``config.json`` as a dict); refuses an unknown multimodal one."""
    model_type = config.get("model_type")
    for family in families():
        if model_type in family.model_types:
            return family
    if "vision_config" in config or "text_config" in config:
        known = ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in families() if f.multimodal)
        raise FamilyError(f"model type {model_type!r} is not a multimodal family respect-hpc knows; known: {known}")
    return next(f for f in families() if f.name == "causal-lm")


def model_problems(m) -> list[tuple[tuple, str]]:
    """A manifest's models (``m``: a :class:`~respect_hpc.config.schema.Manifest`) whose checkpoint is of a
    multimodal family respect-hpc does not know, or asks image splitting of a family without it, as (field
    location, problem); ``validate`` and every command that reads a manifest report them at their line."""
    problems = []
    for loc, spec in ((("model", "path"), m.model), (("decoder", "model", "path"), m.decoder.model)):
        config = spec.path / "config.json" if spec is not None and not spec.gguf_file else None
        if config is None or not config.is_file():
            continue
        try:
            family = family_of(json.loads(config.read_text()))
        except FamilyError as exc:
            problems.append((loc, str(exc)))
            continue
        except ValueError:
            problems.append((loc, f"'{config}' is not valid JSON"))
            continue
        if spec.image_splitting and family.multimodal and not family.splits_images:
            problems.append(((*loc[:-1], "image_splitting"), f"the {family.name} family does not split images "
                                                              "(expected false)"))
    return problems


def interfaces() -> tuple[str, ...]:
    """The models `tiny-model --like` can rebuild offline."""
    return tuple(name for family in families() for name in family.interfaces)


def interface_family(like: str) -> Family:
    """The family that rebuilds the interface named ``like``."""
    for family in families():
        if like in family.interfaces:
            return family
    raise FamilyError(f"--like {like!r}: expected one of {', '.join(interfaces())}")
