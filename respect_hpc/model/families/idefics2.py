"""IDEFICS2 (the paper's IDEFICS2-8B): a SigLIP vision model, a perceiver resampler and a Mistral text model.

Each image becomes ``<fake_token_around_image>`` + ``image_seq_len`` x ``<image>`` + fake token (64 per crop
for IDEFICS2-8B; five crops with splitting); a message ends with ``<end_of_utterance>``. The official runs
put LoRA on the text model, the modality projection and the perceiver resampler, never the vision model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from respect_hpc.model.families import Family, FamilyError

_PAPER = r"(?!.*vision_model\.).*\.(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj)"
# the official runs' regex (multitask.gin), verbatim: the paper's modules and o_proj
_OFFICIAL = r".*(text_model|modality_projection|perceiver_resampler).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"


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

def mistral_v1_sentencepiece() -> Path:
    """The Mistral-7B v0.1 SentencePiece model shipped inside the ``mistral-common`` wheel."""
    spec = importlib.util.find_spec("mistral_common")
    path = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1" if spec else None
    if path is None or not path.is_file():
        raise FamilyError("the Mistral v1 tokenizer needs the 'mistral-common' package "
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
        raise FamilyError(f"rebuilt IDEFICS2 tokenizer has special tokens at {ids} and {len(tokenizer)} tokens; "
                           "expected 32000-32002 and 32003")
    return tokenizer


def write_interface(like: str, folder: Path) -> None:
    """IDEFICS2-8B's full-size config, tokenizer, processor and generation config, without weights, rebuilt
    offline (``idefics2-8b``); ``idefics2-8b-text``: its Mistral-7B language model as a causal LM with the
    same tokenizer and template."""
    from transformers import Idefics2ImageProcessor, Idefics2Processor

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


def set_image_tokens(config: dict, processor_config: dict, tokens: int) -> None:
    """Tokens an image becomes: the perceiver's latents and the processor's image_seq_len together."""
    config["perceiver_config"]["resampler_n_latents"] = tokens
    processor_config["image_seq_len"] = tokens


def configure_processor(processor, image_size: int, image_splitting: bool) -> None:
    """Images at ``image_size`` with or without splitting, whatever the checkpoint's processor config says
    (IDEFICS2-8B ships 980 px with splitting; the official ReSpect runs 224 px without)."""
    images = processor.image_processor
    images.do_image_splitting = image_splitting
    images.size = {"longest_edge": image_size, "shortest_edge": image_size}


FAMILY = Family(
    name="idefics2", model_types=("idefics2",), multimodal=True,
    lora_targets={
        # q, k, v, o, gate, up, down projections of the text model, the modality projector and the perceiver
        # resampler (the official runs)
        "official": _OFFICIAL,
        # the same without o_proj (the paper's description)
        "paper": _PAPER,
        # also the vision model's out_proj, fc1, fc2
        "enhanced": rf"{_PAPER}|.*vision_model\..*\.(out_proj|fc1|fc2)",
    },
    end_of_turn="<end_of_utterance>", image_token="<image>", vision_tower="vision_model",
    configure_processor=configure_processor, image_tokens_per_crop=lambda processor: processor.image_seq_len,
    replica_sizes={"perceiver_config": {"resampler_depth": 1, "resampler_n_heads": 2, "resampler_head_dim": 16,
                                        "num_key_value_heads": 1}},
    interfaces=("idefics2-8b", "idefics2-8b-text"), write_interface=write_interface, set_image_tokens=set_image_tokens,
)
