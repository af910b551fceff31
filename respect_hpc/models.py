"""Load models from local folders, fingerprint them, and build tiny ones offline.

A model is a transformers checkpoint folder (a causal LM, or an Idefics2-style
image-text-to-text model) or a GGUF file in a folder. Nothing is fetched from a
hub. :func:`build_tiny_idefics2` makes a few-hundred-thousand-parameter
Idefics2 with its own byte-level BPE tokenizer and processor, for tests and the
demo on a machine without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from respect_hpc.hashing import bytes_digest
from respect_hpc.manifest import ModelSection
from respect_hpc.prompts import DECODER_TEMPLATES, POLICY_TEMPLATES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


class ModelError(ValueError):
    """A model folder that cannot be used, with what is wrong and where."""


def _check_folder(spec: ModelSection) -> None:
    if not spec.path.is_dir():
        raise ModelError(f"model.path: no such folder '{spec.path}'")
    if spec.gguf_file and not (spec.path / spec.gguf_file).is_file():
        raise ModelError(f"model.gguf_file: no file '{spec.gguf_file}' in '{spec.path}'")
    if not spec.gguf_file and not (spec.path / "config.json").is_file():
        raise ModelError(f"model.path: '{spec.path}' has no config.json (not a transformers checkpoint; "
                         "for a GGUF file set model.gguf_file)")


def load_tokenizer(spec: ModelSection):
    from transformers import AutoTokenizer

    _check_folder(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    if not tokenizer.chat_template:
        raise ModelError(f"model.path: the tokenizer in '{spec.path}' has no chat template; "
                         "add chat_template.jinja to the folder")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_multimodal(config) -> bool:
    return hasattr(config, "vision_config") and hasattr(config, "text_config")


def load_text_model(spec: ModelSection, device: str | torch.device = "cpu"):
    """A model for text-only use (the feedback decoder): the LM of a multimodal checkpoint works too."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    _check_folder(spec)
    config = AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    cls = AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM
    model = cls.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=DTYPES[spec.dtype])
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF weights arrive dequantised
        model.hf_quantizer.remove_quantization_config(model)
    return model.to(device).eval()


def model_fingerprint(spec: ModelSection, memo: Path | None = None) -> str:
    """A digest of a model's config and weights: equal fingerprints, equal model.

    Hashing the weights of a large model takes a while, so digests are memoised in
    ``memo`` (a JSON file, written when it learns a new one) by file path, size and modification time.
    """
    _check_folder(spec)
    cache = json.loads(memo.read_text()) if memo and memo.is_file() else {}
    known = len(cache)
    files = sorted(p for p in spec.path.iterdir()
                   if p.suffix in WEIGHT_SUFFIXES or p.name in ("config.json", "tokenizer.json"))
    if spec.gguf_file:
        files = [spec.path / spec.gguf_file]
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        stat = path.stat()
        memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        cache[memo_key] = cache.get(memo_key) or bytes_digest(path)
        digest.update(f"{path.name}:{cache[memo_key]}\n".encode())
    if memo and len(cache) > known:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, memo)
    return digest.hexdigest()


TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>",
                       "<end_of_utterance>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _tiny_corpus(extra: list[str]) -> list[str]:
    texts = [t.question + " " + t.answer_line + " " + " ".join(t.labels) + " " + " ".join(t.labels).lower()
             for t in DECODER_TEMPLATES.values()]
    texts += [t.intro + " " + t.none_selected + " " + t.selected for t in POLICY_TEMPLATES.values()]
    texts += [w for t in DECODER_TEMPLATES.values() for label in t.labels for w in (label, label.lower())]
    texts += ["Select Deselect select " + " ".join("ABCDEFGHIJ") + " Listener: Speaker: Assistant: User: System:"]
    return (texts + extra) * 4


def _tiny_tokenizer(corpus: list[str] | None, vocab_size: int):
    """A byte-level BPE tokenizer trained offline on the prompts' words (and ``corpus``), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_tiny_corpus(corpus or []), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="<end_of_utterance>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<fake_token_around_image>", "<end_of_utterance>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _text_config(tokenizer, hidden_size: int, layers: int) -> dict:
    return dict(model_type="llama", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, max_position_embeddings=4096)


def build_tiny_causal_lm(folder: str | Path, *, seed: int = 0, corpus: list[str] | None = None,
                         vocab_size: int = 1024, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a tiny random-weight Llama (a text-only policy) and its tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = _tiny_tokenizer(corpus, vocab_size)
    config = _text_config(tokenizer, hidden_size, layers)
    config.pop("model_type")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_idefics2(folder: str | Path, *, seed: int = 0, corpus: list[str] | None = None,
                        vocab_size: int = 1024, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a tiny random-weight Idefics2 (safetensors), its tokenizer and processor to ``folder``.

    ``hidden_size`` and ``layers`` size its text model (the benchmarks use a larger one)."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessor, Idefics2Processor

    folder = Path(folder)
    tokenizer = _tiny_tokenizer(corpus, vocab_size)
    config = Idefics2Config(
        text_config=_text_config(tokenizer, hidden_size, layers),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=14),
        perceiver_config=dict(hidden_size=hidden_size, resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=16, num_key_value_heads=1),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = Idefics2Processor(image_processor=Idefics2ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 224, "shortest_edge": 224}),
                                  tokenizer=tokenizer, image_seq_len=8, chat_template=TINY_CHAT_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def teach_label_words(folder: Path, turns, steps: int = 150, seed: int = 0) -> None:
    """Fine-tune a tiny model (all weights, plain torch) to answer decoder prompts with a label word.

    A random-weight model answers decoder prompts with random tokens and labels a round
    all one way; the demo and the tests teach it the words of synthetic follow-ups
    (:func:`synthetic.follow_up_label`) on ``turns`` (a turns table) so that labels vary.
    """
    from respect_hpc.decode import chat_prompt
    from respect_hpc.prompts import decoder_prompt
    from respect_hpc.synthetic import follow_up_label

    spec = ModelSection(path=folder, dtype="fp32")
    tokenizer, model = load_tokenizer(spec), load_text_model(spec)
    rows = []
    for template in DECODER_TEMPLATES.values():
        for t in turns.filter("has_follow_up").iter_rows(named=True):
            prompt = chat_prompt(tokenizer, decoder_prompt(template, t["previous_action"], t["utterance"],
                                                           t["action"], t["follow_up"]))
            answer = follow_up_label(t["follow_up"], template.labels) + tokenizer.eos_token
            ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            rows.append((ids, len(tokenizer(prompt, add_special_tokens=False)["input_ids"])))
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (16,), generator=generator)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([[-100] * n + ids[n:] + [-100] * (width - len(ids)) for ids, n in batch])
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)


_PAPER_LORA = r"(?!.*vision_model\.).*\.(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj)"
LORA_PLACEMENTS = {
    # q, k, v, gate, up, down projections everywhere but the vision model: the text model, the
    # modality projector and the perceiver resampler (every layer of a text-only LM)
    "paper": _PAPER_LORA,
    # also the vision model's out_proj, fc1, fc2
    "enhanced": rf"{_PAPER_LORA}|.*vision_model\..*\.(out_proj|fc1|fc2)",
}


def load_processor(spec: ModelSection):
    """The processor of a multimodal checkpoint (tokenizer and image processor), or None for a text LM."""
    from transformers import AutoConfig, AutoProcessor

    _check_folder(spec)
    if not is_multimodal(AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file)):
        return None
    return AutoProcessor.from_pretrained(spec.path)


def load_policy(spec: ModelSection, *, r: int, alpha: int, dropout: float, placement: str,
                adapter: Path | None = None, seed: int = 0):
    """The base model with LoRA adapters: new ones (seeded) or trainable copies of a saved ``adapter``."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    _check_folder(spec)
    config = AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    cls = AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM
    model = cls.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=DTYPES[spec.dtype])
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(f"previous adapter: no adapter_config.json in '{adapter}'")
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_PLACEMENTS[placement],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)
