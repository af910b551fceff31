"""Decode stage: label every logged action that has a follow-up with the original base model.

One call of :func:`run_shard` is one array task: it decodes the windows of its
shard that no earlier round decoded, streaming labels chunk by chunk into a
temporary file that becomes ``part-IIIII-of-NNNNN.parquet`` by an atomic rename;
a part that is current is skipped. :func:`merge` checks the parts, adds them to
the cross-round cache and writes the round's per-turn feedback table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

import jobs.ingest
from jobs.ingest import TURNS_FILE
from respect_hpc.cluster import executors as launch
from respect_hpc.model.scorer import FeedbackScorer
from respect_hpc.core.hashing import file_digest, spec_hash
from respect_hpc.data.feedback import FEEDBACK, LABELS, SPEC_KEY, MergeError, check_parts, decoder_key, is_current, labels_frame, part_name, precomputed_labels, shard_of, shard_spec, window_keys
from respect_hpc.config.schema import Manifest
from respect_hpc.model.loading import load_text_model, load_tokenizer, model_fingerprint
from respect_hpc.model.chat import decoder_text
from respect_hpc.domain.prompts import LABEL_VALUES, decoder_template
from respect_hpc.core.rundir import RunDir
from respect_hpc.core.io import SPEC_HASH_KEY, atomic_write_parquet, parquet_metadata

FEEDBACK_FILE = "feedback.parquet"
CACHE_FILE = "labels.parquet"
console = Console(stderr=True, soft_wrap=True)  # log lines stay whole in SLURM logs


@dataclass(frozen=True)
class KindPlan:
    """What one feedback kind (binary or ternary) needs decoded in a round."""

    kind: str
    template_key: str
    fingerprint: str
    decoder_key: str
    folder: Path            # feedback/<decoder key>
    round_: int
    windows: pl.DataFrame   # every decodable turn of the round, with its key and shard
    earlier: pl.DataFrame   # cached labels from earlier rounds
    pending: pl.DataFrame   # unique windows no earlier round decoded

    @property
    def parts(self) -> Path:
        return self.folder / f"round-{self.round_}"

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


def decoder_model(manifest: Manifest):
    """The decoder is the original base model unless the manifest names another."""
    return manifest.decoder.model or manifest.model


def plan(manifest: Manifest, n_shards: int) -> list[KindPlan]:
    """Per feedback kind the variants use: the round's windows, what earlier rounds decoded, what is left."""
    run = RunDir.of(manifest)
    turns_path = run.data / TURNS_FILE
    if not turns_path.is_file():
        raise FileNotFoundError(f"{turns_path}: no turns table; run the ingest stage first")
    turns = pl.read_parquet(turns_path)
    fingerprint = model_fingerprint(decoder_model(manifest), run.root / "cache" / "fingerprints.json")
    plans = []
    for kind in sorted({v.feedback for v in manifest.variants} - set(manifest.decoder.labels)):
        template = decoder_template(manifest.decoder.templates[kind])
        key = decoder_key(template, fingerprint)
        folder = run.root / "feedback" / key
        windows = window_keys(turns, template, fingerprint).with_columns(shard=shard_of(n_shards))
        cache = folder / CACHE_FILE
        earlier = (pl.read_parquet(cache).filter(pl.col("decoded_in_round") < manifest.round)
                   if cache.is_file() and parquet_metadata(cache) else pl.DataFrame(schema=LABELS))  # damaged: redo
        pending = windows.join(earlier, on="key", how="anti").unique("key", keep="first", maintain_order=True)
        plans.append(KindPlan(kind, template.key, fingerprint, key, folder, manifest.round, windows, earlier,
                              pending))
    return plans


def run_shard(manifest: Manifest, shard: int, n_shards: int) -> dict[str, int]:
    """Decode shard ``shard`` of ``n_shards`` for every feedback kind; returns windows decoded per kind."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"--shard {shard}: expected 0 to {n_shards - 1}")
    decoded: dict[str, int] = {}
    model = tokenizer = None
    for kind_plan in plan(manifest, n_shards):
        spec = kind_plan.spec(shard, n_shards)
        path = kind_plan.parts / part_name(shard, n_shards)
        if is_current(path, spec):
            console.print(f"{kind_plan.kind}: {path} is current, skipped")
            continue
        todo = kind_plan.pending.filter(pl.col("shard") == shard)
        if model is None and todo.height:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_text_model(decoder_model(manifest), device)
            tokenizer = load_tokenizer(decoder_model(manifest))
        decoded[kind_plan.kind] = _decode_to_part(manifest, kind_plan, todo, spec, path, model, tokenizer)
    return decoded


def submit_shards(manifest: Manifest, n_shards: int, executor_kind: str | None = None) -> list[str]:
    """Run every shard as one array job of the manifest's executor and wait; returns the job ids."""
    ex = launch.executor(manifest, "decode", executor_kind)
    submitted = ex.map_array(run_shard, [manifest] * n_shards, list(range(n_shards)), [n_shards] * n_shards)
    console.print(f"decode: {n_shards} shards submitted as {submitted[0].job_id.split('_')[0]} "
                  f"({executor_kind or manifest.cluster.executor}); logs in {ex.folder.parent}")
    for job in submitted:
        job.result()  # raises FailedJobError with the failing shard's error
    return [job.job_id for job in submitted]


def decoder_prompts(todo: pl.DataFrame, template_key: str, tokenizer) -> list[str]:
    """The decoder prompt of each turn of ``todo`` (previous_action, utterance, action, follow_up)."""
    template = decoder_template(template_key)
    return [decoder_text(tokenizer, template, prev, utterance, action, follow_up)
            for prev, utterance, action, follow_up
            in todo.select("previous_action", "utterance", "action", "follow_up").iter_rows()]


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} examples/s")


def _decode_to_part(manifest: Manifest, kind_plan: KindPlan, todo: pl.DataFrame, spec: dict, path: Path,
                    model, tokenizer) -> int:
    """Score ``todo`` chunk by chunk into a temporary Parquet file, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # from a task that was killed
        leftover.unlink()
    tmp = path.parent / f".{path.name}.{time.time_ns()}.tmp"
    schema = LABELS.to_arrow().with_metadata({SPEC_KEY: json.dumps(spec, sort_keys=True),
                                              SPEC_HASH_KEY: spec_hash(spec)})
    template = decoder_template(kind_plan.template_key)
    chunk_rows = manifest.decoder.chunk_rows
    start = time.perf_counter()
    try:
        with pq.ParquetWriter(tmp, schema) as writer, Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
                console=console, transient=True) as progress:
            task = progress.add_task(f"{kind_plan.kind} shard {spec['shard']}/{spec['num_shards']}",
                                     total=todo.height)
            scorer = FeedbackScorer(model, tokenizer, template, manifest.decoder.batch_tokens) if todo.height else None
            for offset in range(0, todo.height, chunk_rows):
                chunk = todo.slice(offset, chunk_rows)
                scored = []
                for batch in scorer.score(decoder_prompts(chunk, kind_plan.template_key, tokenizer)):
                    scored += batch
                    progress.advance(task, len(batch))
                scored.sort(key=lambda s: s.index)
                labels = labels_frame(template, chunk["key"].to_list(), scored, manifest.round)
                writer.write_table(labels.to_arrow().cast(schema))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    elapsed = time.perf_counter() - start
    console.print(f"{kind_plan.kind}: {todo.height} windows decoded in {elapsed:.1f} s "
                  f"({todo.height / max(elapsed, 1e-9):.1f} examples/s), {kind_plan.reused(spec['shard'])} "
                  f"reused from earlier rounds -> {path}")
    return todo.height


def done_shards(manifest: Manifest, n_shards: int, plans: list[KindPlan] | None = None) -> set[int]:
    """Shards whose parts are current for every feedback kind (none before the ingest stage is done)."""
    if plans is None:
        if not jobs.ingest.is_done(manifest):
            return set()
        plans = plan(manifest, n_shards)
    return {s for s in range(n_shards)
            if all(is_current(p.parts / part_name(s, n_shards), p.spec(s, n_shards)) for p in plans)}


def _precomputed(manifest: Manifest) -> dict[str, Path]:
    """The feedback kinds the variants use whose labels the manifest gives instead of decoding them."""
    return {k: p for k, p in sorted(manifest.decoder.labels.items()) if k in {v.feedback for v in manifest.variants}}


def _merge_hash(manifest: Manifest, plans: list[KindPlan], n_shards: int) -> str:
    given = _precomputed(manifest)  # their windows come from the turns table
    return spec_hash({"parts": [spec_hash(p.spec(s, n_shards)) for p in plans for s in range(n_shards)],
                      "labels": {k: file_digest(p) for k, p in given.items()},
                      "turns": file_digest(RunDir.of(manifest).data / TURNS_FILE) if given else None})


def merge_done(manifest: Manifest, n_shards: int, plans: list[KindPlan] | None = None) -> bool:
    path = RunDir.of(manifest).round(manifest.round) / FEEDBACK_FILE
    if plans is None:
        if not (path.is_file() and jobs.ingest.is_done(manifest)):
            return False
        plans = plan(manifest, n_shards)
    return path.is_file() and parquet_metadata(path).get(SPEC_HASH_KEY) == _merge_hash(manifest, plans, n_shards)


def merge(manifest: Manifest, n_shards: int) -> pl.DataFrame:
    """Check every part, update the cache and write round-R/feedback.parquet; returns that table."""
    frames = []
    plans = plan(manifest, n_shards)
    for kind_plan in plans:
        specs = {s: kind_plan.spec(s, n_shards) for s in range(n_shards)}
        parts = check_parts(kind_plan.parts, specs, {s: set(kind_plan.shard_keys(s)) for s in specs})
        labels = pl.concat([kind_plan.earlier, *parts]).cast(dict(LABELS))
        atomic_write_parquet(labels, kind_plan.folder / CACHE_FILE)
        per_turn = kind_plan.windows.join(labels, on="key", how="left")
        unlabelled = per_turn.filter(pl.col("label").is_null())
        if unlabelled.height:
            raise MergeError(f"{kind_plan.folder}: {unlabelled.height} windows have no label, e.g. "
                             f"{unlabelled['game_turn_id'][0]}")
        frames.append(per_turn.with_columns(kind=pl.lit(kind_plan.kind), decoder_key=pl.lit(kind_plan.decoder_key)))
    frames += [_precomputed_feedback(manifest, kind, path) for kind, path in _precomputed(manifest).items()]
    feedback = (pl.concat([f.select(pl.col(c) if c in f.columns else pl.lit(None, t).alias(c)
                                    for c, t in FEEDBACK.items()).cast(dict(FEEDBACK)) for f in frames])
                if frames else pl.DataFrame(schema=FEEDBACK))
    atomic_write_parquet(feedback, RunDir.of(manifest).round(manifest.round) / FEEDBACK_FILE,
                         {SPEC_HASH_KEY: _merge_hash(manifest, plans, n_shards)})
    return feedback


def _precomputed_feedback(manifest: Manifest, kind: str, path: Path) -> pl.DataFrame:
    """The round's windows with the labels of ``path``; windows it has no label for are reported, and left
    out of training."""
    try:
        frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_ndjson(path)
    except Exception as exc:  # a corrupt or unreadable file: name it
        raise MergeError(f"decoder.labels.{kind}: cannot read '{path}' ({exc})") from None
    labels = precomputed_labels(frame, kind, f"decoder.labels.{kind} '{path}'")
    windows = pl.read_parquet(RunDir.of(manifest).data / TURNS_FILE).filter("has_follow_up").select(
        "game_turn_id", "round", "policy")
    unlabelled = windows.join(labels, on="game_turn_id", how="anti")
    if unlabelled.height:
        console.print(f"decoder.labels.{kind}: {unlabelled.height} of {windows.height} windows have no label in "
                      f"'{path}' (e.g. {unlabelled['game_turn_id'][0]}); they are not trained on")
    words = {value: word for word, value in LABEL_VALUES.items()}
    return windows.join(labels, on="game_turn_id", how="inner").with_columns(
        kind=pl.lit(kind), decoder_key=pl.lit(f"labels-{file_digest(path)}"), key=pl.col("game_turn_id"),
        label_word=pl.col("label").replace_strict(words, return_dtype=pl.String),
        decoded_in_round=pl.lit(manifest.round, pl.Int64))


def label_counts(feedback: pl.DataFrame) -> pl.DataFrame:
    """Decoded labels per round, policy and kind: the end-of-stage summary."""
    return (feedback.group_by("kind", "round", "policy")
            .agg(*(pl.col("label_word").eq(w).sum().alias(w.lower()) for w in ("Positive", "Neutral", "Negative")),
                 pl.len().alias("windows"))
            .sort("kind", "round", "policy"))


def check_generation(manifest: Manifest, feedback: pl.DataFrame, n: int, seed: int = 0) -> tuple[int, int]:
    """Greedy-generate the answer for ``n`` sampled windows per kind; returns (agreeing, checked)."""
    spec = decoder_model(manifest)
    model = load_text_model(spec, "cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(spec)
    all_turns = pl.read_parquet(RunDir.of(manifest).data / TURNS_FILE)
    agree = checked = 0
    for kind, rows in feedback.partition_by("kind", as_dict=True).items():
        sample = rows.sample(min(n, rows.height), seed=seed)
        turns = all_turns.join(sample.select("game_turn_id", "label"), on="game_turn_id")
        template = decoder_template(manifest.decoder.templates[kind[0]])
        scorer = FeedbackScorer(model, tokenizer, template, manifest.decoder.batch_tokens)
        answers = scorer.generate(decoder_prompts(turns, template.key, tokenizer))
        words = [None if a is None else template.labels[a] for a in answers]
        agree += sum(w is not None and LABEL_VALUES[w] == label for w, label in zip(words, turns["label"]))
        checked += turns.height
    return agree, checked
