"""Schemas of the normalised log tables: one row per game, one row per logged action, refused rows.

Every stage reads and writes Parquet tables; this module names the columns of the log tables once
(core/io.py writes them atomically).
"""

from __future__ import annotations

import polars as pl

_STR_LIST = pl.List(pl.String)

# One row per game: the normalised form of both public layouts.
INTERACTIONS = pl.Schema({
    "game_id": pl.String,
    "round": pl.Int64,
    "policy": pl.String,
    "speaker": pl.String,        # hashed speaker id, "h:<16 hex>"
    "date": pl.String,
    "dataset_alias": pl.String,
    "context": _STR_LIST,        # image names in the listener's order (A, B, ...)
    "targets": _STR_LIST,
    "chat": _STR_LIST,           # speaker utterances, one per turn
    "clicks": pl.List(_STR_LIST),  # the selection after each turn
    "prob_action": pl.List(pl.Float64),  # p of each action when the policy acted; nulls if unlogged
    "success": pl.Boolean,
    "num_turns": pl.Int64,
})

# One row per logged action.
TURNS = pl.Schema({
    "game_turn_id": pl.String,   # "<game_id>_<turn_id>"
    "game_id": pl.String,
    "turn_id": pl.Int64,         # 0-based position in the game
    "round": pl.Int64,
    "policy": pl.String,
    "context": _STR_LIST,
    "targets": _STR_LIST,
    "chats": _STR_LIST,          # utterances up to and including this turn
    "utterance": pl.String,
    "currently_selected": _STR_LIST,  # before the action
    "selected": _STR_LIST,
    "deselected": _STR_LIST,
    "action": pl.String,         # canonical action text in listener letters
    "previous_action": pl.String,  # null on a game's first turn
    "follow_up": pl.String,      # the next utterance, "" on the last turn
    "has_follow_up": pl.Boolean,  # False on a game's last action: no feedback to decode
    "prob_action": pl.Float64,
    "game_success": pl.Boolean,
})

# Rows refused at ingest, kept aside with the reason instead of being dropped.
QUARANTINE = pl.Schema({
    "file": pl.String,
    "row": pl.Int64,             # 1-based row (Parquet) or line (JSON lines)
    "game_id": pl.String,
    "field": pl.String,
    "reason": pl.String,
})
