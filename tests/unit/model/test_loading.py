"""What a model load refuses with one line before it starts: a transformers older than the floor, and attention
kernels this machine cannot run."""

import pytest

from respect_hpc.model.loading import ModelError, check_transformers


def test_a_transformers_older_than_the_floor_is_refused_in_one_line():
    with pytest.raises(ModelError, match=r"^transformers 5\.17\.0 is installed; respect-hpc needs >= 5\.21 \(a 2-D "
                                         r"logits_to_keep mask in Idefics2 and Mistral\): pip install -U "
                                         r"'transformers>=5\.21'$"):
        check_transformers("5.17.0")
    check_transformers("5.21.0")
    check_transformers("6.0.0.dev0")
    check_transformers()  # the installed one meets the floor pyproject.toml declares


def test_flash_attention_where_it_cannot_run_is_refused_in_one_line(tmp_path):
    """This machine has neither flash-attn nor a CUDA GPU (a node with both loads it; the test then skips)."""
    import importlib.util

    import torch

    from respect_hpc.config.schema import ModelSection
    from respect_hpc.model.loading import check_attention

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn and a CUDA GPU are here: flash_attention_2 can run")
    with pytest.raises(ModelError, match=r"^model\.attention: flash_attention_2 needs (the flash-attn package|a CUDA "
                                         r"GPU)( and a CUDA GPU)?, which this machine lacks: install flash-attn on a "
                                         r"GPU node, or set model\.attention=sdpa$"):
        check_attention(ModelSection(path=tmp_path, attention="flash_attention_2"))
    for attention in ("sdpa", "eager"):
        check_attention(ModelSection(path=tmp_path, dtype="fp32", attention=attention))
