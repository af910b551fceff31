"""The transformers floor: an older release is refused with one line before any model loads."""

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
