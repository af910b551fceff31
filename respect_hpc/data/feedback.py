"""Decoded-feedback tables: window keys, shards, part files and their checks.

A decoded label is keyed by (decoder model fingerprint, prompt template, window
content), so a window seen in an earlier round is never decoded again. Windows
are split into shards by key; each shard's part file records the hash of the
spec that made it, and the merge refuses parts that are missing, stale or
duplicated.

    feedback/<decoder key>/labels.parquet                        every label so far (the cache)
    feedback/<decoder key>/round-<R>/part-00003-of-00008.parquet  labels new in round R
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from respect_hpc import __version__
from respect_hpc.config.schema import DecoderSection
from respect_hpc.core.errors import RespectError
from respect_hpc.core.io import parquet_metadata
from respect_hpc.core.rundir import FeedbackDir, part_name
from respect_hpc.domain.prompts import LABEL_VALUES, DecoderTemplate, decoder_template

# One row per decoded window.
LABELS = pl.Schema({
    "key": pl.String,
    "label": pl.Int8,              # 1 positive, 0 neutral, -1 negative
    "label_word": pl.String,
    "logprob_positive": pl.Float64,
    "logprob_neutral": pl.Float64,  # null for a binary decoder
    "logprob_negative": pl.Float64,
    "prompt_tokens": pl.Int32,
    "decoded_in_round": pl.Int64,  # the round whose decode stage produced the label
})

# One row per turn with a follow-up, per feedback kind: what training reads.
FEEDBACK = pl.Schema({
    "game_turn_id": pl.String, "round": pl.Int64, "policy": pl.String, "kind": pl.String,
    "decoder_key": pl.String, "key": pl.String, **{k: v for k, v in LABELS.items() if k != "key"},
})

_PART = re.compile(r"part-(\d{5})-of-(\d{5})\.parquet$")
SPEC_KEY = "respect_hpc.spec"


class MergeError(RespectError, ValueError):
    """A set of part files that does not make a whole, current, disjoint decoded table."""


def decoder_key(template: DecoderTemplate, fingerprint: str) -> str:
    return f"{template.name}-v{template.version}-{fingerprint[:12]}"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def decodable() -> pl.Expr:
    """The turns whose feedback is decoded: those with a follow-up utterance that is not empty (the official
    code drops a window whose follow-up is "", igl.py; it says nothing to decode)."""
    return pl.col("has_follow_up") & (pl.col("follow_up") != "")


def window_keys(turns: pl.DataFrame, template: DecoderTemplate, fingerprint: str) -> pl.DataFrame:
    """The decodable turns with their window key."""
    windows = turns.filter(decodable()).select(
        "game_turn_id", "round", "policy", "previous_action", "utterance", "action", "follow_up")
    salt = f"{fingerprint}\x00{template.key}\x00"
    content = pl.concat_str(pl.col("previous_action").is_null().cast(pl.String),
                            pl.col("previous_action").fill_null(""), "utterance", "action", "follow_up",
                            separator="\x00")
    return windows.with_columns(key=content.map_batches(
        lambda s: pl.Series([_digest(salt + text) for text in s], dtype=pl.String), return_dtype=pl.String))


def shard_of(n_shards: int) -> pl.Expr:
    """The shard of each window: a deterministic function of its key alone."""
    return pl.col("key").str.slice(0, 8).str.to_integer(base=16) % n_shards


def shard_spec(key: str, template: DecoderTemplate, fingerprint: str, shard: int, n_shards: int,
               pending: pl.Series) -> dict:
    """What a shard's part is made from; its hash says whether a part on disk is current."""
    return {"decoder_key": key, "template": template.key, "fingerprint": fingerprint, "shard": shard,
            "num_shards": n_shards, "windows": len(pending),
            "pending_digest": _digest("\n".join(pending.sort().to_list())), "code": __version__}


def part_spec(path: Path) -> dict | None:
    """The spec a part was written with, or None for a file that is not a readable part."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # unreadable: treated as missing by the caller
        return None
    raw = metadata.get(SPEC_KEY.encode())
    return json.loads(raw) if raw else None


def is_current(path: Path, spec: dict) -> bool:
    return path.is_file() and part_spec(path) == spec


def labels_frame(template: DecoderTemplate, keys: list[str], scored: list, round_: int) -> pl.DataFrame:
    """Decoded labels of ``keys`` from the scorer's answers, in :data:`LABELS` form."""
    names = [label.lower() for label in template.labels]
    columns = {f"logprob_{name}": [s.logprobs[names.index(name)] if name in names else None for s in scored]
               for name in ("positive", "neutral", "negative")}
    words = [template.labels[s.label] for s in scored]
    return pl.DataFrame({
        "key": keys, "label": [LABEL_VALUES[w] for w in words], "label_word": words, **columns,
        "prompt_tokens": [s.tokens for s in scored], "decoded_in_round": [round_] * len(keys),
    }, schema=LABELS)


def check_parts(folder: Path, specs: dict[int, dict], expected: dict[int, set[str]]) -> list[pl.DataFrame]:
    """The labels in the part files of ``folder`` for shards 0..N-1, or MergeError naming the first wrong one.

    Each part must exist, hold the shard its name says, carry the current spec, and
    hold exactly its shard's windows; as shards are a function of the key, parts
    that pass are disjoint.
    """
    n_shards = len(specs)
    parts = []
    for shard, spec in specs.items():
        path = folder / part_name(shard, n_shards)
        rerun = f"rerun decode --shard {shard} --num-shards {n_shards}"
        found = part_spec(path) if path.is_file() else None
        if found is None:
            raise MergeError(f"{path}: missing or unreadable: {rerun}")
        if found.get("shard") != shard or found.get("num_shards") != n_shards:
            raise MergeError(f"{path}: holds shard {found.get('shard')} of {found.get('num_shards')}, "
                             f"a duplicate of {part_name(found.get('shard', 0), found.get('num_shards', 1))}: {rerun}")
        if found != spec:
            raise MergeError(f"{path}: stale (made from other windows, decoder or code): {rerun}")
        part = pl.read_parquet(path)
        if set(part["key"]) != expected[shard]:
            raise MergeError(f"{path}: holds {part.height} windows, expected {len(expected[shard])}: {rerun}")
        parts.append(part)
    return parts


def precomputed_labels(frame: pl.DataFrame, kind: str, source: str) -> pl.DataFrame:
    """Labels decoded elsewhere, in the public feedback_decoder_* layout: (game_turn_id, label), checked."""
    missing = sorted({"game_turn_id", "predictions"} - set(frame.columns))
    if missing:
        raise MergeError(f"{source}: missing columns {', '.join(missing)} of the public feedback_decoder_{kind} "
                         "layout (game_turn_id, predictions -1/0/1)")
    allowed = {-1, 1} if kind == "binary" else {-1, 0, 1}
    labels = frame.select(pl.col("game_turn_id").cast(pl.String),
                          pl.col("predictions").cast(pl.Int8, strict=False).alias("label"),
                          pl.col("predictions").cast(pl.String).alias("_raw"))
    bad = labels.with_row_index("row", offset=1).filter(pl.col("game_turn_id").is_null()
                                                        | ~pl.col("label").is_in(list(allowed)).fill_null(False))
    if bad.height:
        row = bad.row(0, named=True)
        raise MergeError(f"{source}: row {row['row']}: predictions: expected one of "
                         f"{', '.join(map(str, sorted(allowed)))} for {kind} feedback, got {row['_raw']}")
    repeated = labels.filter(pl.col("game_turn_id").is_duplicated())
    if repeated.height:
        raise MergeError(f"{source}: game_turn_id {repeated['game_turn_id'][0]} has more than one label")
    return labels.drop("_raw")


@dataclass(frozen=True)
class KindPlan:
    """What one feedback kind (binary or ternary) needs decoded in a round."""

    kind: str
    template_key: str
    fingerprint: str
    decoder_key: str
    folder: FeedbackDir
    round_: int
    windows: pl.DataFrame   # every decodable turn of the round, with its key and shard
    earlier: pl.DataFrame   # cached labels from earlier rounds
    pending: pl.DataFrame   # unique windows no earlier round decoded

    def part(self, shard: int, n_shards: int) -> Path:
        return self.folder.part(self.round_, shard, n_shards)

    def reused(self, shard: int) -> int:
        """Windows of a shard whose label an earlier round decoded."""
        return self.windows.filter(pl.col("shard") == shard).join(self.earlier, on="key", how="semi").height

    def spec(self, shard: int, n_shards: int) -> dict:
        return shard_spec(self.decoder_key, decoder_template(self.template_key), self.fingerprint, shard, n_shards,
                          self.shard_keys(shard))

    def shard_keys(self, shard: int) -> pl.Series:
        return self._by_shard.get(shard, pl.Series("key", [], pl.String))

    @cached_property
    def _by_shard(self) -> dict[int, pl.Series]:
        return {s: frame["key"] for (s,), frame in self.pending.partition_by("shard", as_dict=True).items()}


def plan_decoding(turns: pl.DataFrame, decoder: DecoderSection, kinds: list[str], fingerprint: str, folder_of,
                  round_: int, n_shards: int) -> list[KindPlan]:
    """Per feedback kind of ``kinds`` that ``decoder`` decodes (not given as labels): the round's windows,
    what earlier rounds decoded (the labels in ``folder_of(decoder key)``), and what is left, in shards."""
    plans = []
    for kind in sorted(set(kinds) - set(decoder.labels)):
        template = decoder_template(decoder.templates[kind])
        d_key = decoder_key(template, fingerprint)
        folder = folder_of(d_key)
        windows = window_keys(turns, template, fingerprint).with_columns(shard=shard_of(n_shards))
        cache = folder.labels
        earlier = (pl.read_parquet(cache).filter(pl.col("decoded_in_round") < round_)
                   if cache.is_file() and parquet_metadata(cache) else pl.DataFrame(schema=LABELS))  # damaged: redo
        pending = windows.join(earlier, on="key", how="anti").unique("key", keep="first", maintain_order=True)
        plans.append(KindPlan(kind, template.key, fingerprint, d_key, folder, round_, windows, earlier, pending))
    return plans


def label_counts(feedback: pl.DataFrame) -> pl.DataFrame:
    """Decoded labels per round, policy and kind: the end-of-stage summary."""
    return (feedback.group_by("kind", "round", "policy")
            .agg(*(pl.col("label_word").eq(w).sum().alias(w.lower()) for w in ("Positive", "Neutral", "Negative")),
                 pl.len().alias("windows"))
            .sort("kind", "round", "policy"))
