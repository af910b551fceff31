"""Read interaction logs in the public ReSpect layouts and explode them into turns.

Sources are Parquet or JSON-lines files (or folders of them) in the public
``interaction`` layout (one row per game) or ``turn`` layout (one row per turn).
Both become one normalised interactions table (:data:`tables.INTERACTIONS`),
checked row by row; a bad row is refused with ``FILE: row N: field: reason``,
or kept aside in a quarantine table when the caller asks, never dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from respect_hpc.core.errors import RespectError
from respect_hpc.core.io import atomic_write_parquet
from respect_hpc.core.rundir import DataDir
from respect_hpc.data.tables import INTERACTIONS, QUARANTINE, TURNS
from respect_hpc.domain.multiref import DEFAULT_MAX_TURNS, LETTERS
from respect_hpc.domain.policies import PUBLIC_POLICIES

INTERACTION_LAYOUT = {"game_id", "chat", "clicks", "context", "targets", "end", "policy_name", "round"}
TURN_LAYOUT = {"game_id", "turn_id", "chats", "currently_selected", "selected", "deselected",
               "context", "targets", "end", "policy_name", "round"}

@dataclass(frozen=True)
class _Kind:
    """What a column of the public layouts holds: in words, as a JSON value, as a Parquet type."""
    expected: str
    value_ok: Callable[[object], bool]
    dtype_ok: Callable[[pl.DataType], bool]
    dtype: pl.DataType | None = None  # what a column typed Null (all cells null or empty lists) is read as


def _strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(dtype: pl.DataType, inner: Callable[[pl.DataType], bool]) -> bool:
    return dtype == pl.Null or (isinstance(dtype, pl.List) and (dtype.inner == pl.Null or inner(dtype.inner)))


def _holds_null(dtype: pl.DataType) -> bool:
    return dtype == pl.Null or (isinstance(dtype, pl.List) and _holds_null(dtype.inner))


_STR = _Kind("a string", lambda v: isinstance(v, str), lambda t: t in (pl.String, pl.Null), pl.String)
_STR_LIST = _Kind("a list of strings", _strings, lambda t: _list_of(t, lambda i: i == pl.String),
                  pl.List(pl.String))
_CLICKS = _Kind("a list of lists of strings", lambda v: isinstance(v, list) and all(_strings(x) for x in v),
                lambda t: _list_of(t, lambda i: _STR_LIST.dtype_ok(i)), pl.List(pl.List(pl.String)))
_FIELD_TYPES = {
    "game_id": _STR, "policy_name": _STR,
    "chat": _STR_LIST, "chats": _STR_LIST, "context": _STR_LIST, "targets": _STR_LIST,
    "currently_selected": _STR_LIST, "selected": _STR_LIST, "deselected": _STR_LIST,
    "clicks": _CLICKS,
    "round": _Kind("an integer round", lambda v: isinstance(v, (str, int)) and not isinstance(v, bool),
                   lambda t: t.is_integer() or t in (pl.String, pl.Null)),
    "end": _Kind("'successful', 'unsuccessful', 0 or 1", lambda v: isinstance(v, (str, int, bool)),
                 lambda t: t.is_integer() or t in (pl.String, pl.Boolean, pl.Null)),
    "prob_action": _Kind("a list of probabilities (or null where p was not logged)",
                         lambda v: isinstance(v, list) and all(x is None or _number(x) for x in v),
                         lambda t: _list_of(t, lambda i: i.is_numeric()), pl.List(pl.Float64)),
}
# In the turn layout `clicks` is either the images toggled in each turn so far (a list of lists, as the official
# generator writes it) or the selection after the turn (a list of strings); either must agree with the action.
_TURN_FIELD_TYPES = {
    **_FIELD_TYPES,
    "clicks": _Kind("a list of strings (the selection after the turn) or a list of lists of strings (the images "
                    "toggled in each turn so far)", lambda v: _STR_LIST.value_ok(v) or _CLICKS.value_ok(v),
                    lambda t: _STR_LIST.dtype_ok(t) or _CLICKS.dtype_ok(t), pl.List(pl.String)),
    "turn_id": _Kind("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool),
                     lambda t: t.is_integer() or t == pl.Null, pl.Int64),
    "prob_action": _Kind("a probability (or null where p was not logged)", _number,
                         lambda t: t.is_numeric() or t == pl.Null, pl.Float64),
}


def _is_turn_layout(columns: set[str] | dict) -> bool:
    return "chat" not in columns and any(c in columns for c in TURN_LAYOUT - INTERACTION_LAYOUT)


# p values the official bot logged where it could not compute one: read as missing p
SENTINEL_P = (-1.0, -2.0, -3.0)


class IngestError(RespectError, ValueError):
    """A source that cannot be read, or a bad row when quarantine is off."""


@dataclass(frozen=True)
class IngestResult:
    interactions: pl.DataFrame
    turns: pl.DataFrame
    quarantine: pl.DataFrame
    rows_in: int
    unscored: dict[str, int] = dataclasses.field(default_factory=dict)  # per file: actions whose p was a sentinel (-1/-2/-3)

    @property
    def rows_out(self) -> int:
        return self.rows_in - self.rows_quarantined

    @property
    def rows_quarantined(self) -> int:
        return int(self.quarantine["rows"].sum()) if self.quarantine.height else 0

    def accounting(self) -> str:
        sentinels = "".join(f"; {file}: {n} actions with the bot's sentinel p (-1, -2 or -3), read as missing p"
                            for file, n in self.unscored.items())
        return (f"rows in {self.rows_in} = rows out {self.rows_out} "
                f"+ rows quarantined {self.rows_quarantined}{sentinels}")


def source_files(sources: list[str | Path]) -> list[Path]:
    """Expand files and folders into the Parquet and JSON-lines files they hold, in order."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
            if not found:
                raise IngestError(f"{source}: folder holds no .parquet or .jsonl files")
            files += found
        elif source.is_file():
            files.append(source)
        elif source.exists():
            raise IngestError(f"{source}: not a regular file or folder")
        else:
            raise IngestError(f"{source}: no such file or folder")
    return files


def hash_speaker(speaker: str) -> str:
    """A stable pseudonym for a speaker id; already-hashed ids pass through."""
    if speaker.startswith("h:"):
        return speaker
    return "h:" + hashlib.sha256(speaker.encode()).hexdigest()[:16]


class _RepeatedKey(ValueError):
    """A JSON object that names one key twice."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated is not None:
        raise _RepeatedKey(repeated)
    return dict(pairs)


def _read_jsonl(path: Path) -> tuple[pl.DataFrame, list[dict]]:
    """Rows of a JSON-lines file, with a row-level error for each line of wrong shape."""
    rows, errors = [], []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(_error(path, line_no, None, "line", f"not UTF-8 text (byte {raw[exc.start]:#04x} "
                                                                 f"at column {exc.start + 1})"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as exc:
                errors.append(_error(path, line_no, None, "line", f"not valid JSON ({exc.msg})"))
                continue
            except _RepeatedKey as exc:
                errors.append(_error(path, line_no, None, str(exc), "given twice in one record (which to keep "
                                                                     "is a guess)"))
                continue
            if not isinstance(record, dict):
                errors.append(_error(path, line_no, None, "line", "expected a JSON object"))
                continue
            types = _TURN_FIELD_TYPES if _is_turn_layout(record) else _FIELD_TYPES
            problem = next((field for field, kind in types.items()
                            if field in record and record[field] is not None and not kind.value_ok(record[field])),
                           None)
            if problem:
                errors.append(_error(path, line_no, record.get("game_id"), problem,
                                     f"expected {types[problem].expected}"))
                continue
            if _is_turn_layout(record) and isinstance(record.get("clicks"), list):
                _split_turn_clicks(record)
            for field in ("end", "round", "speaker", "date", "dataset_alias"):
                if record.get(field) is not None:
                    record[field] = str(record[field])
            p = record.get("prob_action")  # JSON writes 1 or the bot's -1 as integers
            if p is not None:
                record["prob_action"] = [None if x is None else float(x) for x in p] if isinstance(p, list) else float(p)
            record["_row"] = line_no
            rows.append(record)
    columns = sorted({key for row in rows for key in row})
    frame = pl.DataFrame({c: [row.get(c) for row in rows] for c in columns}) if rows else pl.DataFrame()
    return frame, errors


def _split_turn_clicks(record: dict) -> None:
    """A JSON turn record's ``clicks`` in the column of its form: ``_toggled`` (this turn's) or ``_after``."""
    clicks = record.pop("clicks")
    if clicks and all(isinstance(c, list) for c in clicks):
        record["_clicks_toggled"] = clicks[-1]
        record["_clicks_toggles"] = clicks
    else:
        record["_clicks_after"] = clicks


def _turn_clicks(frame: pl.DataFrame) -> pl.DataFrame:
    """A Parquet turn frame's ``clicks`` column in the column of its form (see :func:`_split_turn_clicks`)."""
    if "clicks" not in frame.columns:
        return frame
    if frame.schema["clicks"] == pl.List(pl.List(pl.String)):
        return frame.with_columns(_clicks_toggled=pl.col("clicks").list.last(),
                                  _clicks_toggles=pl.col("clicks")).drop("clicks")
    return frame.rename({"clicks": "_clicks_after"})


def _error(path: Path, row: int, game_id: object, field: str, reason: str, rows: int = 1) -> dict:
    return {"file": str(path), "row": row, "game_id": None if game_id is None else str(game_id),
            "field": field, "reason": reason, "rows": rows}


def _read_file(path: Path) -> tuple[pl.DataFrame, list[dict], int]:
    """One source file as (frame with ``_row``, row errors, number of records read)."""
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise IngestError(f"{path}: expected a .parquet or .jsonl (JSON lines) file of the public layout, "
                          f"got a '{path.suffix or 'suffix-less'}' file")
    if path.suffix == ".parquet":
        try:
            frame = pl.read_parquet(path)
        except Exception as exc:  # a corrupt or non-Parquet file: name it
            raise IngestError(f"{path}: cannot read as Parquet ({exc})") from None
        frame = frame.with_row_index("_row", offset=1).with_columns(pl.col("_row").cast(pl.Int64))
        errors: list[dict] = []
    else:
        frame, errors = _read_jsonl(path)
    columns = set(frame.columns)
    layout = TURN_LAYOUT if _is_turn_layout(columns) else INTERACTION_LAYOUT
    missing = sorted(layout - columns)
    if frame.height and missing:
        raise IngestError(f"{path}: missing columns {', '.join(missing)} of the public "
                          f"{'interaction' if layout is INTERACTION_LAYOUT else 'turn'} layout")
    kinds = {f: k for f, k in (_TURN_FIELD_TYPES if layout is TURN_LAYOUT else _FIELD_TYPES).items() if f in columns}
    for field, kind in kinds.items():
        if frame.height and not kind.dtype_ok(frame.schema[field]):
            raise IngestError(f"{path}: column {field}: expected {kind.expected}, got {frame.schema[field]}")
    frame = frame.with_columns(pl.col(f).cast(k.dtype) for f, k in kinds.items()
                               if k.dtype is not None and _holds_null(frame.schema[f]))
    records = frame.height + len(errors)
    if not frame.height:
        return pl.DataFrame(schema=_GAMES), errors, records
    frame = (_from_interaction_layout(frame) if layout is INTERACTION_LAYOUT
             else _from_turn_layout(_turn_clicks(frame) if path.suffix == ".parquet" else frame))
    return frame.with_columns(_file=pl.lit(str(path))).select(_GAMES.names()).cast(dict(_GAMES)), errors, records


# A source file's games: the normalised columns plus where each came from and what it said.
_GAMES = pl.Schema({**INTERACTIONS, "_end": pl.String, "_round": pl.String, "_row": pl.Int64, "_rows": pl.Int64,
                    "_turn_gap": pl.Boolean, "_turn_repeat": pl.Int64, "_turn_repeat_row": pl.Int64,
                    "_clicks_mismatch": pl.Int64, "_clicks_mismatch_row": pl.Int64,
                    "_end_disagree": pl.Boolean,
                    "_file": pl.String})


def _optional(frame: pl.DataFrame, name: str, dtype: pl.DataType) -> pl.Expr:
    return pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype)


_END = (pl.col("end").cast(pl.String).str.to_lowercase().str.strip_chars()
        .replace_strict({"successful": "1", "1": "1", "true": "1", "unsuccessful": "0", "0": "0", "false": "0"},
                        default=None))


def _from_interaction_layout(frame: pl.DataFrame) -> pl.DataFrame:
    chat_len = pl.col("chat").list.len()
    return frame.select(
        pl.col("game_id").cast(pl.String),
        pl.col("round").cast(pl.Int64, strict=False),
        pl.col("policy_name").cast(pl.String).alias("policy"),
        _optional(frame, "speaker", pl.String).alias("speaker"),
        _optional(frame, "date", pl.String).alias("date"),
        _optional(frame, "dataset_alias", pl.String).alias("dataset_alias"),
        "context", "targets", "chat",
        pl.col("clicks").cast(pl.List(pl.List(pl.String))),
        pl.coalesce(_optional(frame, "prob_action", pl.List(pl.Float64)),
                    pl.col("chat").list.eval(pl.lit(None, pl.Float64))).alias("prob_action"),  # p unlogged
        (_END == "1").alias("success"),
        chat_len.cast(pl.Int64).alias("num_turns"),
        pl.col("end").cast(pl.String).alias("_end"),
        pl.col("round").cast(pl.String).alias("_round"),
        "_row",
        pl.lit(1, pl.Int64).alias("_rows"),
        pl.lit(False).alias("_turn_gap"),
        pl.lit(None, pl.Int64).alias("_turn_repeat"),
        pl.lit(None, pl.Int64).alias("_turn_repeat_row"),
        pl.lit(None, pl.Int64).alias("_clicks_mismatch"),
        pl.lit(None, pl.Int64).alias("_clicks_mismatch_row"),
        pl.lit(False).alias("_end_disagree"),
    )


def selection_after() -> pl.Expr:
    """The selection after a turn's action: before - deselected + selected, sorted."""
    return (pl.col("currently_selected").list.set_difference("deselected")
            .list.concat("selected").list.unique().list.sort())


def _from_turn_layout(frame: pl.DataFrame) -> pl.DataFrame:
    """Group turn rows into games, with the selection after each turn."""
    after = selection_after()
    utterance = pl.col("chats").list.last()
    toggled = pl.col("selected").list.concat("deselected").list.unique().list.sort()
    disagree = (
        (_optional(frame, "_clicks_after", pl.List(pl.String)).list.unique().list.sort() != after).fill_null(False)
        | (_optional(frame, "_clicks_toggled", pl.List(pl.String)).list.unique().list.sort() != toggled)
        .fill_null(False))
    return (
        frame.with_columns(
            pl.col("turn_id").cast(pl.Int64, strict=False),
            _after=after, _utterance=utterance, _disagree=disagree,
            _p=_optional(frame, "prob_action", pl.Float64),
            _speaker=_optional(frame, "speaker", pl.String),
            _date=_optional(frame, "date", pl.String),
            _alias=_optional(frame, "dataset_alias", pl.String),
        )
        .sort("game_id", "turn_id", "_row")
        .group_by("game_id", maintain_order=True)
        .agg(
            pl.col("round").first().cast(pl.Int64, strict=False),
            pl.col("policy_name").first().cast(pl.String).alias("policy"),
            pl.col("_speaker").first().alias("speaker"),
            pl.col("_date").first().alias("date"),
            pl.col("_alias").first().alias("dataset_alias"),
            pl.col("context").first(), pl.col("targets").first(),
            pl.col("_utterance").alias("chat"),
            pl.col("_after").alias("clicks"),
            pl.col("_p").alias("prob_action"),
            (_END.first() == "1").alias("success"),
            pl.len().cast(pl.Int64).alias("num_turns"),
            pl.col("end").cast(pl.String).first().alias("_end"),
            pl.col("round").cast(pl.String).first().alias("_round"),
            pl.col("_row").min(),
            pl.len().cast(pl.Int64).alias("_rows"),
            ((pl.col("turn_id").diff().drop_nulls() != 1).any() | pl.col("turn_id").is_null().any()
             | (pl.col("turn_id").min() != 0)).alias("_turn_gap"),
            pl.col("turn_id").filter(pl.col("turn_id").is_duplicated()).first().alias("_turn_repeat"),
            pl.col("_row").filter(pl.col("turn_id").is_duplicated()).max().alias("_turn_repeat_row"),
            pl.col("turn_id").filter("_disagree").first().alias("_clicks_mismatch"),
            pl.col("_row").filter("_disagree").first().alias("_clicks_mismatch_row"),
            (_END.n_unique() > 1).alias("_end_disagree"),
            pl.col("turn_id").alias("_turn_ids"),
            pl.col("chats").last().alias("_chats"),
            _optional(frame, "_clicks_toggles", pl.List(pl.List(pl.String))).last().alias("_toggles"),
        )
        .pipe(_complete_partial_games)
    )


def _complete_partial_games(games: pl.DataFrame) -> pl.DataFrame:
    """Games of a turn-layout file that holds only some of their turns (a filtered set, as the official code
    keeps the good ones): each turn row carries the game so far (its utterances and the images toggled in every
    turn), so the game up to its last kept turn is rebuilt from that row, and every kept row must agree with
    it. Turns the file leaves out stay history (p unknown); without the toggles the gap is a bad row."""
    partial = games.filter(pl.col("_turn_gap") & pl.col("_toggles").is_not_null()
                           & pl.col("_turn_ids").list.eval(pl.element().is_not_null().all()).list.first())
    if partial.is_empty():
        return games
    rebuilt = []
    for game in partial.iter_rows(named=True):
        chats, toggles, kept = game["_chats"], game["_toggles"], game["_turn_ids"]
        selection, after = set(), []
        for toggled in toggles:
            selection ^= set(toggled)
            after.append(sorted(selection))
        n = len(chats)
        fits = len(toggles) == n == max(kept) + 1 and all(0 <= t < n for t in kept)
        mismatch = next((t for t, utterance, clicks in zip(kept, game["chat"], game["clicks"])
                         if not fits or chats[t] != utterance or after[t] != sorted(clicks)), None)
        p = [None] * n
        for t, value in zip(kept, game["prob_action"]):
            if 0 <= t < n:
                p[t] = value
        rebuilt.append({**game, "chat": chats, "clicks": after, "prob_action": p, "num_turns": n, "_turn_gap": False,
                        "_clicks_mismatch": mismatch if fits else kept[0],
                        "_clicks_mismatch_row": game["_row"] if mismatch is not None or not fits else None})
    done = pl.DataFrame(rebuilt, schema=games.schema)
    return pl.concat([games.join(partial.select("game_id"), on="game_id", how="anti"), done])


def _problems(max_turns: int, policies: frozenset[str] | None, max_round: int | None) -> pl.Expr:
    """The first problem of a normalised row as "field\\trow\\treason" (the row of the game, or of its turn
    at fault), or null for a good row."""
    n_chat = pl.col("chat").list.len()
    n_clicks = pl.col("clicks").list.len()
    clicked = pl.col("clicks").list.eval(pl.element().explode()).list.unique()
    outside = clicked.list.set_difference("context").list.sort()
    stray_targets = pl.col("targets").list.set_difference("context").list.sort()
    known = ", ".join(sorted(policies or ()))
    round_ok = pl.col("round").is_not_null() & (pl.col("round") >= 0)
    if max_round is not None:
        round_ok &= pl.col("round") <= max_round
    checks = [
        (pl.col("game_id").is_null() | (pl.col("game_id") == ""), "game_id", pl.lit("missing game id")),
        (pl.col("_duplicate_of").is_not_null(), "game_id",
         pl.format("duplicate game id {}, first seen in {} row {}", "game_id", "_first_file", "_duplicate_of")),
        *_null_checks(),
        (pl.col("_end_disagree"), "end", pl.lit("the game's turn rows disagree on how it ended")),
        (n_chat == 0, "chat", pl.lit("empty game: no turns")),
        (pl.col("_turn_repeat").is_not_null(), "turn_id",
         pl.format("turn {} of the game is given twice (which row to keep is a guess)", "_turn_repeat"),
         pl.col("_turn_repeat_row")),
        (pl.col("_turn_gap").fill_null(False), "turn_id",
         pl.lit("turn ids of the game are missing or not consecutive")),
        (n_clicks != n_chat, "clicks", pl.format("{} selections for {} utterances", n_clicks, n_chat)),
        (pl.col("_clicks_mismatch").is_not_null(), "clicks",
         pl.format("turn {}: clicks disagree with currently_selected/selected/deselected", "_clicks_mismatch"),
         pl.col("_clicks_mismatch_row")),
        (n_chat > max_turns, "chat", pl.format("{} turns, more than the limit of {}", n_chat, pl.lit(max_turns))),
        ((pl.col("context").list.len() == 0) | (pl.col("context").list.len() > len(LETTERS)), "context",
         pl.format("expected 1 to {} images, got {}", pl.lit(len(LETTERS)), pl.col("context").list.len())),
        (pl.col("context").list.n_unique() != pl.col("context").list.len(), "context",
         pl.lit("an image appears twice")),
        (stray_targets.list.len() > 0, "targets",
         pl.format("names images outside the context: {}", stray_targets.list.join(" "))),
        (outside.list.len() > 0, "clicks",
         pl.format("names images outside the context: {}", outside.list.join(" "))),
        (pl.col("success").is_null() | pl.col("_end").is_null(), "end",
         pl.format("expected 'successful', 'unsuccessful', 0 or 1, got '{}'", pl.col("_end").fill_null("null"))),
        (pl.col("policy").is_null() | (pl.lit(False) if policies is None else ~pl.col("policy").is_in(list(policies))),
         "policy_name",
         pl.format("unknown policy '{}': expected one of {}", pl.col("policy").fill_null("null"), pl.lit(known))),
        (~round_ok, "round",
         pl.format("unknown round '{}': expected an integer from 0 to {}", pl.col("_round").fill_null("null"),
                   pl.lit("any" if max_round is None else str(max_round)))),
        (pl.col("prob_action").list.len() != n_chat, "prob_action",
         pl.format("{} probabilities for {} turns", pl.col("prob_action").list.len(), n_chat)),
        (pl.col("prob_action").list.eval((pl.element() <= 0) | (pl.element() > 1)).list.any(), "prob_action",
         pl.lit("expected probabilities in (0, 1]")),
    ]
    problem = pl.lit(None, pl.String)
    for bad, field, reason, *row in reversed(checks):  # a reason that comes out null still marks the row bad
        at = (row[0] if row else pl.col("_row")).fill_null(pl.col("_row")).cast(pl.String)
        problem = (pl.when(bad.fill_null(True))
                   .then(pl.concat_str(pl.lit(field + "\t"), at, pl.lit("\t"), reason.fill_null("unreadable value")))
                   .otherwise(problem))
    return problem


def _null_checks() -> list[tuple[pl.Expr, str, pl.Expr]]:
    """Missing lists and null entries in them: never a good row (a null must not read as "nothing")."""
    checks = []
    for column in ("chat", "context", "targets", "clicks"):
        checks.append((pl.col(column).is_null(), column, pl.lit("missing (null)")))
        entries = pl.element().is_null()
        if column == "clicks":
            entries = entries | pl.element().list.eval(pl.element().is_null()).list.any()
        checks.append((pl.col(column).list.eval(entries).list.any(), column, pl.lit("holds a null entry")))
    return checks


def _sentinels_as_missing(games: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """The bot's sentinel p values (-1, -2, -3: it could not compute one) read as missing p; returns the
    games and, per file, how many actions had one."""
    sentinel = pl.element().is_in(SENTINEL_P)
    counts = (games.group_by("_file", maintain_order=True)
              .agg(pl.col("prob_action").list.eval(sentinel.cast(pl.Int64)).list.sum().sum().alias("n"))
              .filter(pl.col("n") > 0))
    games = games.with_columns(pl.col("prob_action").list.eval(pl.when(sentinel).then(None).otherwise(pl.element())))
    return games, dict(zip(counts["_file"].cast(pl.String), counts["n"]))


def read_interactions(sources: list[str | Path], *, quarantine: bool = False, max_turns: int = DEFAULT_MAX_TURNS,
                      policies: list[str] | tuple[str, ...] | None = PUBLIC_POLICIES,
                      max_round: int | None = None) -> tuple[pl.DataFrame, pl.DataFrame, int, dict[str, int]]:
    """Read and check sources; returns (interactions, quarantine, records read, actions per file whose p was
    the bot's sentinel and is read as missing).

    Without ``quarantine`` the first bad row raises :class:`IngestError` naming
    its file, row and field. ``policies=None`` accepts any policy name.
    """
    frames, errors, records = [], [], 0
    for path in source_files(sources):
        frame, file_errors, n = _read_file(path)
        frames.append(frame)
        errors += file_errors
        records += n
    if not frames:
        raise IngestError("no sources given")
    if records == 0:
        raise IngestError(f"{', '.join(map(str, sources))}: no rows: expected games in the public interaction "
                          "layout or turns in the turn layout")
    games, unscored = _sentinels_as_missing(pl.concat(frames))
    first = pl.col("_row").first().over("game_id")
    games = games.with_columns(
        _duplicate_of=pl.when(pl.int_range(pl.len()).over("game_id") > 0).then(first),
        _first_file=pl.col("_file").first().over("game_id"),
    ).with_columns(_problem=_problems(max_turns, None if policies is None else frozenset(policies), max_round))
    bad = games.filter(pl.col("_problem").is_not_null())
    refused = pl.concat([
        pl.DataFrame(errors, schema={**QUARANTINE, "rows": pl.Int64}),
        bad.with_columns(_parts=pl.col("_problem").str.splitn("\t", 3))
        .select(file="_file", row=pl.col("_parts").struct.field("field_1").cast(pl.Int64), game_id="game_id",
                field=pl.col("_parts").struct.field("field_0"), reason=pl.col("_parts").struct.field("field_2"),
                rows="_rows"),
    ]).sort("file", "row")
    if refused.height and not quarantine:
        first_bad = refused.row(0, named=True)
        more = f" (and {refused.height - 1} more bad rows; --quarantine keeps them aside)" if refused.height > 1 else ""
        raise IngestError(f"{first_bad['file']}: row {first_bad['row']}: {first_bad['field']}: "
                          f"{first_bad['reason']}{more}")
    good = games.filter(pl.col("_problem").is_null())
    speakers = good["speaker"].drop_nulls().unique().to_list()
    good = good.with_columns(pl.col("speaker").replace_strict(
        {s: hash_speaker(s) for s in speakers}, default=None, return_dtype=pl.String))
    return good.select(INTERACTIONS.names()).cast(dict(INTERACTIONS)), refused, records, unscored


def _letters(frame: pl.DataFrame, images: str, positions: pl.DataFrame) -> pl.DataFrame:
    """Sorted listener letters of the images in column ``images`` of each turn."""
    return (frame.select("game_turn_id", "game_id", images).explode(images)
            .join(positions, left_on=["game_id", images], right_on=["game_id", "image"], how="inner")
            .group_by("game_turn_id")
            .agg(pl.col("letter").sort().str.join(" ").alias(f"_{images}_letters")))


def explode_turns(interactions: pl.DataFrame) -> pl.DataFrame:
    """One row per logged action (:data:`tables.TURNS`); a game's last action is kept, flagged."""
    empty = pl.lit([], pl.List(pl.String))
    turns = (
        interactions.with_columns(turn_id=pl.int_ranges(0, pl.col("num_turns")))
        .explode("turn_id")
        .with_columns(
            game_turn_id=pl.format("{}_{}", "game_id", "turn_id"),
            chats=pl.col("chat").list.head(pl.col("turn_id") + 1),
            utterance=pl.col("chat").list.get(pl.col("turn_id")),
            after=pl.col("clicks").list.get(pl.col("turn_id")),
            currently_selected=pl.when(pl.col("turn_id") > 0)
            .then(pl.col("clicks").list.get(pl.col("turn_id") - 1, null_on_oob=True)).otherwise(empty),
            has_follow_up=pl.col("turn_id") < pl.col("num_turns") - 1,
            follow_up=pl.col("chat").list.get(pl.col("turn_id") + 1, null_on_oob=True).fill_null(""),
            prob_action=pl.col("prob_action").list.get(pl.col("turn_id")),
        )
        .with_columns(
            selected=pl.col("after").list.set_difference("currently_selected").list.sort(),
            deselected=pl.col("currently_selected").list.set_difference("after").list.sort(),
        )
    )
    positions = (interactions.select("game_id", pl.col("context").alias("image"),
                                     pl.int_ranges(0, pl.col("context").list.len()).alias("pos"))
                 .explode("image", "pos")
                 .with_columns(letter=pl.lit(LETTERS).str.slice(pl.col("pos"), 1)))
    turns = (turns.join(_letters(turns, "selected", positions), on="game_turn_id", how="left")
             .join(_letters(turns, "deselected", positions), on="game_turn_id", how="left"))
    d, s = pl.col("_deselected_letters"), pl.col("_selected_letters")
    action = (pl.when(d.is_not_null() & s.is_not_null()).then(pl.format("deselect {} select {}", d, s))
              .when(d.is_not_null()).then(pl.format("deselect {}", d))
              .when(s.is_not_null()).then(pl.format("select {}", s))
              .otherwise(pl.lit("")))
    return (turns.with_columns(action=action, game_success=pl.col("success"))
            .sort("game_id", "turn_id")
            .with_columns(previous_action=pl.col("action").shift(1).over("game_id"))
            .select(TURNS.names()).cast(dict(TURNS)))


def ingest(sources: list[str | Path], **options) -> IngestResult:
    """Read, check and explode sources (options as :func:`read_interactions`)."""
    interactions, refused, records, unscored = read_interactions(sources, **options)
    return IngestResult(interactions, explode_turns(interactions), refused, records, unscored)


def write_tables(result: IngestResult, folder: DataDir, metadata: dict[str, str] | None = None,
                 turns: pl.DataFrame | None = None) -> None:
    """An ingest's tables in ``folder`` (``turns``: the turns table to write, default the result's), the
    turns table last: the marker that the others are complete."""
    atomic_write_parquet(result.interactions, folder.interactions)
    if result.quarantine.height:
        atomic_write_parquet(result.quarantine, folder.quarantine)
    else:
        folder.quarantine.unlink(missing_ok=True)
    atomic_write_parquet(result.turns if turns is None else turns, folder.turns, metadata)
