"""Tiny random-weight replicas of real checkpoints: the real interface at a size a CPU runs in seconds.

A replica keeps everything a model shows to the code around it (tokenizer,
special-token ids, chat template, processor settings, generation settings, the
architecture family, vocabulary and image-token layout) and scales down only the
widths and depths, with fresh random weights saved as safetensors. Tests, the
demo and a dry run on a login node then meet the same prompts, token ids and
image-token counts as the model a manifest will train.

- :func:`replica_from` scales down any local checkpoint folder (its tokenizer,
  processor and template files are copied as they are).
- :func:`write_interface` writes the interface of a known model without weights:
  ``idefics2-8b`` (rebuilt offline from public parts: the Mistral v1
  SentencePiece model that the ``mistral-common`` wheel ships, IDEFICS2-8B's
  special tokens, chat template, processor and generation configs) and
  ``idefics2-8b-text`` (its Mistral-7B language model as a causal LM with the
  same tokenizer and template, a text-only policy).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS2_SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]  # ids 32000-32002

_MISTRAL_7B_TEXT = {
    "model_type": "mistral", "vocab_size": 32003, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
IDEFICS2_8B_CONFIG = {
    "architectures": ["Idefics2ForConditionalGeneration"], "model_type": "idefics2", "image_token_id": 32001,
    "tie_word_embeddings": False, "use_cache": True,
    "text_config": _MISTRAL_7B_TEXT,
    "vision_config": {"model_type": "idefics2_vision", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 980, "patch_size": 14,
                      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06},
    "perceiver_config": {"model_type": "idefics2_perceiver", "hidden_act": "silu", "resampler_n_latents": 64,
                         "resampler_depth": 3, "resampler_n_heads": 16, "resampler_head_dim": 96,
                         "num_key_value_heads": 4},
}
IDEFICS2_8B_GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 32002], "pad_token_id": 0,
                          "bad_words_ids": [[32000], [32001]]}
IDEFICS2_8B_IMAGE_PROCESSOR = {"do_image_splitting": True, "size": {"longest_edge": 980, "shortest_edge": 378},
                               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
                               "rescale_factor": 1 / 255, "do_convert_rgb": True, "do_pad": True}
INTERFACES = ("idefics2-8b", "idefics2-8b-text")

# The widths and depths of a replica; every other setting is the source's.
TEXT_SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
VISION_SIZE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
PERCEIVER_SIZE = {"resampler_depth": 1, "resampler_n_heads": 2, "resampler_head_dim": 16, "num_key_value_heads": 1}
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


class ReplicaError(ValueError):
    """A source folder that cannot be scaled down, with what is missing."""


def mistral_v1_sentencepiece() -> Path:
    """The Mistral-7B v0.1 SentencePiece model shipped inside the ``mistral-common`` wheel."""
    spec = importlib.util.find_spec("mistral_common")
    path = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1" if spec else None
    if path is None or not path.is_file():
        raise ReplicaError("the Mistral v1 tokenizer needs the 'mistral-common' package "
                           "(pip install mistral-common sentencepiece protobuf)")
    return path


def _idefics2_tokenizer():
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_v1_sentencepiece(), Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS2_SPECIAL_TOKENS})
    tokenizer.chat_template = IDEFICS2_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(IDEFICS2_SPECIAL_TOKENS)
    if ids != [32000, 32001, 32002] or len(tokenizer) != 32003:
        raise ReplicaError(f"rebuilt IDEFICS2 tokenizer has special tokens at {ids} and {len(tokenizer)} tokens; "
                           "expected 32000-32002 and 32003")
    return tokenizer


def write_interface(like: str, folder: str | Path) -> Path:
    """The full-size config, tokenizer, processor and generation config of a known model, without weights."""
    from transformers import Idefics2ImageProcessor, Idefics2Processor

    if like not in INTERFACES:
        raise ReplicaError(f"--like {like!r}: expected one of {', '.join(INTERFACES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _idefics2_tokenizer()
    if like == "idefics2-8b":
        config = IDEFICS2_8B_CONFIG
        Idefics2Processor(image_processor=Idefics2ImageProcessor(**IDEFICS2_8B_IMAGE_PROCESSOR), tokenizer=tokenizer,
                          image_seq_len=64, chat_template=IDEFICS2_CHAT_TEMPLATE).save_pretrained(folder)
    else:
        config = {"architectures": ["MistralForCausalLM"], **_MISTRAL_7B_TEXT}
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(IDEFICS2_8B_GENERATION, indent=2))
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
        if "vision_config" in config:
            out["vision_config"] = _scaled(config["vision_config"], vision_sizes)
        if "perceiver_config" in config:
            out["perceiver_config"] = {**_scaled(config["perceiver_config"], PERCEIVER_SIZE),
                                       "hidden_size": text["hidden_size"]}
        return out
    if not any(k in config for k in TEXT_SIZE):
        raise ReplicaError("config.json names none of " + ", ".join(TEXT_SIZE) + ": cannot scale this model down")
    return _scaled(config, text_sizes)


def replica_from(source: str | Path, folder: str | Path, *, seed: int = 0, hidden_size: int = 64,
                 layers: int = 2, vision: tuple[int, int] = (32, 2), image_tokens: int | None = None) -> Path:
    """A tiny random-weight copy of the checkpoint in ``source``: same interface files, scaled-down config
    (``hidden_size`` and ``layers`` size its text model, ``vision`` (width, depth) its vision model; the
    benchmarks use larger ones). ``image_tokens`` changes how many tokens the perceiver resampler gives an
    image (the config's latents and the processor's ``image_seq_len`` together; IDEFICS2-8B: 64), for a
    policy that must train many steps on a CPU."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig)

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
        processor_file = folder / "processor_config.json"
        if "perceiver_config" not in config or not processor_file.is_file():
            raise ReplicaError(f"image_tokens: '{source}' has no perceiver resampler and processor config")
        config["perceiver_config"]["resampler_n_latents"] = image_tokens
        processor = json.loads(processor_file.read_text())
        processor_file.write_text(json.dumps({**processor, "image_seq_len": image_tokens}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    loaded = AutoConfig.from_pretrained(folder)
    multimodal = hasattr(loaded, "vision_config") and hasattr(loaded, "text_config")
    torch.manual_seed(seed)
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = cls.from_config(loaded, dtype=torch.float32)
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    model.save_pretrained(folder)
    return folder


def replica_like(like: str, folder: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                 vision: tuple[int, int] = (32, 2), image_tokens: int | None = None) -> Path:
    """A tiny random-weight model with the interface of ``like`` (see :data:`INTERFACES`)."""
    with tempfile.TemporaryDirectory() as tmp:
        return replica_from(write_interface(like, tmp), folder, seed=seed, hidden_size=hidden_size, layers=layers,
                            vision=vision, image_tokens=image_tokens)
