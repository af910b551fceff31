"""The frozen vision model's output, computed once per crop and shared on disk.

Where the LoRA placement leaves the vision model frozen (the paper's), its output for a crop depends on
the crop's pixels and the model only. :func:`cache_vision` puts a :class:`CachedVision` in the model's
place: it keys every crop by a digest of its pixels and patch mask (so image, size, splitting and dtype
are all in the key), answers from memory (on the device the states were computed on, so a step moves no
features between host and GPU), then from ``folder`` (one safetensors file a crop, written atomically,
shared by every task of a round: epochs, seeds, variants, validation), and runs the vision model (in eval
mode, without gradient) only for crops seen nowhere. The trainable parts after it (the modality projection
and the perceiver resampler) run as usual. A model whose vision parameters train (the enhanced placement) is
left as it is.

The digests are the costly part (every pixel hashed): the batch builder computes them on the CPU, where the
pixels are made (in the prefetch worker on a GPU, off the critical path, and once per image and padded size),
of the pixels and pixel masks, and hands them over with :func:`known_crops` around the forward pass (training,
validation, generation). Without them the cache hashes what the vision model is given (pixels and patch masks):
other keys for the same crops, so those crops are computed once more, never mixed up.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutput


def crop_key(pixels: torch.Tensor, patch_mask: torch.Tensor | None) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((pixels.dtype, tuple(pixels.shape))).encode())
    digest.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if patch_mask is not None:
        digest.update(patch_mask.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


_KNOWN: ContextVar[list[str] | None] = ContextVar("known_crops", default=None)


@contextmanager
def known_crops(keys: list[str] | None) -> Iterator[None]:
    """Within: the crops a forward pass gives the vision model are those of ``keys`` (their
    :func:`crop_key`, in order), so a :class:`CachedVision` need not hash them; None changes nothing."""
    token = _KNOWN.set(keys)
    try:
        yield
    finally:
        _KNOWN.reset(token)


class CachedVision(torch.nn.Module):
    """Stands in for a frozen vision model (``vision``), answering each crop's last hidden state once known."""

    def __init__(self, vision: torch.nn.Module, folder: Path | None):
        super().__init__()
        self.vision, self.folder = vision, folder
        self.memory: dict[str, torch.Tensor] = {}  # on the device they were computed on or read to
        self.computed = 0  # crops the vision model ran on in this process
        self.hashed = 0  # crops whose pixels the cache had to hash itself (no known_crops)

    def _load(self, key: str, device: torch.device) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        path = self.folder / f"{key}.safetensors" if self.folder else None
        if path is None or not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            self.memory[key] = load_file(path, device=str(device))["state"]
        except (SafetensorError, OSError, KeyError):  # damaged: computed again and rewritten
            return None
        return self.memory[key]

    def _store(self, key: str, state: torch.Tensor) -> None:
        self.memory[key] = state
        if self.folder is None:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        save_file({"state": state.to("cpu")}, tmp)
        os.replace(tmp, self.folder / f"{key}.safetensors")

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutput:
        digests = _KNOWN.get()
        if digests is None or len(digests) != len(pixel_values):
            masks = [None] * len(pixel_values) if patch_attention_mask is None else list(patch_attention_mask)
            digests = [crop_key(p, m) for p, m in zip(pixel_values, masks)]
            self.hashed += len(digests)
        # a digest is of the pixels as built; the state also depends on the dtype the model reads them in
        keys = [f"{digest}-{str(pixel_values.dtype).removeprefix('torch.')}" for digest in digests]
        device = pixel_values.device
        states = {key: self._load(key, device) for key in set(keys)}
        missing = sorted({k for k, state in states.items() if state is None}, key=keys.index)
        if missing:
            rows = [keys.index(k) for k in missing]
            was_training = self.vision.training
            self.vision.eval()
            with torch.no_grad():
                out = self.vision(pixel_values=pixel_values[rows], patch_attention_mask=None
                                  if patch_attention_mask is None else patch_attention_mask[rows]).last_hidden_state
            self.vision.train(was_training)
            self.computed += len(rows)
            for key, state in zip(missing, out):
                states[key] = state.detach().clone()
                self._store(key, states[key])
        return BaseModelOutput(last_hidden_state=torch.stack([states[k] for k in keys]).to(device))


def vision_tower(model: torch.nn.Module, tower: str | None) -> tuple[str, torch.nn.Module] | None:
    """The vision model of ``model`` (module name ending in ``tower``, the family's) and its name, or None."""
    if tower is None:
        return None
    return next(((name, module) for name, module in model.named_modules()
                 if name.split(".")[-1] == tower and not isinstance(module, CachedVision)), None)


def cache_vision(model: torch.nn.Module, folder: Path | None, tower: str | None) -> CachedVision | None:
    """Put a :class:`CachedVision` in place of ``model``'s frozen vision model (named ``tower`` by its family);
    None (nothing changed) for a model without one, or whose vision parameters train."""
    found = vision_tower(model, tower)
    if found is None or any(p.requires_grad for p in found[1].parameters()):
        return None
    name, module = found
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    cached = CachedVision(module, folder)
    setattr(parent, name.rsplit(".", 1)[-1], cached)
    return cached
