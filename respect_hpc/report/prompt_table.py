"""The exact texts a model sees for each logged turn (``respect-hpc prompts``).

For every turn of a turns table: the policy prompt for generation (images in the
logged order, ``<image>`` placeholders not yet expanded), its training target,
and the binary and ternary decoder prompts (null on a game's last turn, which
has no follow-up). Everything goes through the same rendering as decoding and
training (:mod:`respect_hpc.model.chat`), so what this shows is what runs.
"""

from __future__ import annotations

import polars as pl

from respect_hpc.data.datasets import with_history
from respect_hpc.domain.prompts import (
    DEFAULT_DECODER_TEMPLATE,
    DEFAULT_POLICY_TEMPLATE,
    decoder_template,
    policy_template,
)
from respect_hpc.model.chat import decoder_text, policy_text, without_images
from respect_hpc.model.policy_inputs import policy_view


def prompt_rows(turns: pl.DataFrame, tokenizer, *, images: bool = True, limit: int | None = None,
                policy_key: str = DEFAULT_POLICY_TEMPLATE,
                decoder_keys: dict[str, str] = DEFAULT_DECODER_TEMPLATE) -> list[dict]:
    """One dict per turn (:data:`COLUMNS`), in game and turn order."""
    template = policy_template(policy_key)
    decoders = {kind: decoder_template(key) for kind, key in decoder_keys.items()}
    rows = with_history(turns)
    if limit is not None:
        rows = rows.head(limit)
    out = []
    for row in rows.iter_rows(named=True):
        view = policy_view(row, template)
        text = policy_text(tokenizer, view.messages if images else without_images(view.messages), view.action)
        decoded = {kind: decoder_text(tokenizer, d, row["previous_action"], row["utterance"], row["action"],
                                      row["follow_up"]) if row["has_follow_up"] else None
                   for kind, d in decoders.items()}
        out.append({"game_turn_id": row["game_turn_id"], "policy": text.prompt, "policy_target": text.target,
                    "decoder_binary": decoded.get("binary"), "decoder_ternary": decoded.get("ternary")})
    return out
