"""Load models from local folders (base, processor, LoRA policy) and fingerprint them.

A model is a transformers checkpoint folder (a causal LM, or an image-text-to-text model of a known family,
model/families/) or a GGUF file in a folder. Nothing is fetched from a hub; tiny models with a real
interface come from :mod:`respect_hpc.model.replica`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from respect_hpc.config.schema import ModelSection
from respect_hpc.core.errors import RespectError
from respect_hpc.core.hashing import bytes_digest
from respect_hpc.core.io import atomic_write_text
from respect_hpc.model.families import Family, family_of
from respect_hpc.model.policy_inputs import PolicyEncoder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelError(RespectError, ValueError):
    """A model folder that cannot be used, with what is wrong and where."""


def _check_folder(spec: ModelSection) -> None:
    if not spec.path.is_dir():
        raise ModelError(f"model.path: no such folder '{spec.path}'")
    if spec.gguf_file and not (spec.path / spec.gguf_file).is_file():
        raise ModelError(f"model.gguf_file: no file '{spec.gguf_file}' in '{spec.path}'")
    if not spec.gguf_file and not (spec.path / "config.json").is_file():
        raise ModelError(f"model.path: '{spec.path}' has no config.json (not a transformers checkpoint; "
                         "for a GGUF file set model.gguf_file)")


def model_family(spec: ModelSection) -> Family:
    """The family of a model folder (a GGUF file is a text-only causal LM)."""
    _check_folder(spec)
    if spec.gguf_file:
        return family_of({})
    try:
        config = json.loads((spec.path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot read '{spec.path / 'config.json'}' ({exc})") from None
    return family_of(config if isinstance(config, dict) else {})


def is_multimodal_model(spec: ModelSection) -> bool:
    return model_family(spec).multimodal


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


TRANSFORMERS_FLOOR = (5, 21)  # a 2-D boolean logits_to_keep (answer positions only) in Idefics2 and Mistral


def check_transformers(version: str | None = None) -> None:
    """Refuses, with one line, a transformers older than the code needs (``version``: the installed one)."""
    import transformers

    version = version or transformers.__version__
    found = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if found < TRANSFORMERS_FLOOR:
        floor = ".".join(map(str, TRANSFORMERS_FLOOR))
        raise ModelError(f"transformers {version} is installed; respect-hpc needs >= {floor} (a 2-D logits_to_keep "
                         f"mask in Idefics2 and Mistral): pip install -U 'transformers>={floor}'")


def check_attention(spec: ModelSection) -> None:
    """Refuses, with one line, ``model.attention: flash_attention_2`` where it cannot run: without the flash-attn
    package or without a CUDA GPU (the manifest already refuses it in fp32)."""
    if spec.attention != "flash_attention_2":
        return
    missing = [what for what, there in (("the flash-attn package", importlib.util.find_spec("flash_attn")),
                                        ("a CUDA GPU", torch.cuda.is_available())) if not there]
    if missing:
        raise ModelError(f"model.attention: flash_attention_2 needs {' and '.join(missing)}, which this machine "
                         f"lacks: install flash-attn on a GPU node, or set model.attention=sdpa")


def _load_model(spec: ModelSection, family: Family):
    """The checkpoint's weights in the manifest's dtype, as the family's model class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    check_transformers()
    check_attention(spec)
    cls = AutoModelForImageTextToText if family.multimodal else AutoModelForCausalLM
    model = cls.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=DTYPES[spec.dtype],
                                attn_implementation=spec.attention)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF weights arrive dequantised
        model.hf_quantizer.remove_quantization_config(model)
    return model


def load_text_model(spec: ModelSection, device: str | torch.device = "cpu"):
    """A model for text-only use (the feedback decoder): the LM of a multimodal checkpoint works too."""
    return _load_model(spec, model_family(spec)).to(device).eval()


def _documentation(path: Path) -> bool:
    """Files of a checkpoint folder that change nothing a model does: its docs, licences and hidden files."""
    name = path.name.lower()
    return name.startswith(".") or name.endswith(".md") or name.startswith(("license", "notice", "use_policy"))


def model_fingerprint(spec: ModelSection, memo: Path | None = None) -> str:
    """A digest of everything a model folder brings that changes its behaviour: weights, config, tokenizer
    files, chat template, processor and generation configs (every top-level file but documentation), or the
    GGUF file. Equal fingerprints, equal model.

    Hashing the weights of a large model takes a while, so digests are memoised in ``memo`` (a JSON file, where
    given; a memo that cannot be written is only a slower start) by path, size, inode, modification and change
    times: a file rewritten in place, even with its old size and modification time, has a new change time."""
    _check_folder(spec)
    try:
        cache = json.loads(memo.read_text()) if memo and memo.is_file() else {}
    except (OSError, ValueError):  # a damaged memo is only a slower start
        cache = {}
    known = len(cache)
    if spec.gguf_file:
        files = [spec.path / spec.gguf_file]
    else:
        files = sorted(p for p in spec.path.iterdir() if p.is_file() and not _documentation(p))
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        stat = path.stat()
        memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
        cache[memo_key] = cache.get(memo_key) or bytes_digest(path)
        digest.update(f"{path.name}:{cache[memo_key]}\n".encode())
    if memo and len(cache) > known:
        try:
            atomic_write_text(json.dumps(cache, indent=1), memo)
        except OSError:
            pass  # a read-only run directory: the digests are computed again next time
    return digest.hexdigest()


def load_processor(spec: ModelSection):
    """The processor of a multimodal checkpoint, or None for a text LM; images are processed at
    ``model.image_size`` with ``model.image_splitting`` (the family maps them onto its processor)."""
    from transformers import AutoProcessor

    family = model_family(spec)
    if not family.multimodal:
        return None
    processor = (family.load_processor or AutoProcessor.from_pretrained)(spec.path)
    family.configure_processor(processor, spec.image_size, spec.image_splitting)
    return processor


def load_encoder(spec: ModelSection, images: Path | None) -> PolicyEncoder:
    """The policy's input encoder for a model: its processor (multimodal) or tokenizer (text), images read
    from ``images``."""
    processor = load_processor(spec)
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(spec)
    return PolicyEncoder(processor, tokenizer, images, model_family(spec))


def load_policy(spec: ModelSection, *, r: int = 8, alpha: int = 8, dropout: float = 0.1,
                placement: str = "official", init: str = "gaussian", adapter: Path | None = None, seed: int = 0,
                gradient_checkpointing: bool = False):
    """The base model with LoRA adapters: new ones (seeded; ``r``, ``alpha``, ``dropout``, ``placement`` and
    ``init``, the official runs' by default: A ~ N(0, 1/r) with ``gaussian``, PEFT's Kaiming-uniform with
    ``default``; B zero either way) or trainable copies of a saved ``adapter`` (which brings its own settings:
    its adapter_config.json records targets and init).

    With ``gradient_checkpointing`` the base model recomputes its activations in the backward pass
    (non-reentrant activation checkpointing, with gradients on the input embeddings as PEFT needs under
    reentrant checkpointing; enabled before PEFT wraps the model).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    family = model_family(spec)
    model = _load_model(spec, family)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(f"previous adapter: no adapter_config.json in '{adapter}'")
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=family.lora_targets[placement],
                      init_lora_weights="gaussian" if init == "gaussian" else True, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)
