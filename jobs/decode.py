"""Decode stage: label every logged action that has a follow-up with the original base model.

One task per shard: it decodes the windows of its shard that no earlier round decoded, streaming labels
chunk by chunk into a temporary file that becomes ``part-IIIII-of-NNNNN.parquet`` by an atomic rename; a
part that is current is skipped. The merge stage checks the parts and writes the round's table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from jobs.registry import Stage, Task, check_shard, shard_key
from respect_hpc.config.schema import Manifest
from respect_hpc.core.hashing import spec_hash
from respect_hpc.core.io import SPEC_HASH_KEY
from respect_hpc.core.text import duration, log_console
from respect_hpc.data.feedback import LABELS, SPEC_KEY, KindPlan, is_current, labels_frame, plan_decoding
from respect_hpc.domain.prompts import LABEL_VALUES, decoder_template
from respect_hpc.model.loading import load_text_model, load_tokenizer, model_fingerprint
from respect_hpc.model.scorer import FeedbackScorer, decoder_prompts

console = log_console()


def plans(manifest: Manifest, n_shards: int | None = None) -> list[KindPlan]:
    """Per feedback kind the variants use and the manifest does not label itself: the round's windows, what
    earlier rounds decoded, what is left."""
    run = manifest.run_dir
    return plan_decoding(pl.read_parquet(run.data.turns), manifest.decoder, manifest.feedback_kinds,
                         model_fingerprint(manifest.decoder_model, run.fingerprint_memo), run.feedback,
                         manifest.round, n_shards or manifest.decoder.shards)


def done(manifest: Manifest) -> set[str]:
    """Shards whose parts are current for every feedback kind."""
    n = manifest.decoder.shards
    found = plans(manifest, n)
    return {shard_key(s, n) for s in range(n) if all(is_current(p.part(s, n), p.spec(s, n)) for p in found)}


def run(manifest: Manifest, shard: int, n_shards: int) -> dict[str, int]:
    """Decode shard ``shard`` of ``n_shards`` for every feedback kind; returns windows decoded per kind."""
    check_shard(shard, n_shards)
    decoded: dict[str, int] = {}
    model = tokenizer = None
    for kind_plan in plans(manifest, n_shards):
        spec = kind_plan.spec(shard, n_shards)
        path = kind_plan.part(shard, n_shards)
        if is_current(path, spec):
            console.print(f"{kind_plan.kind}: {path} is current, skipped")
            continue
        todo = kind_plan.pending.filter(pl.col("shard") == shard)
        if model is None and todo.height:
            model = load_text_model(manifest.decoder_model, "cuda" if torch.cuda.is_available() else "cpu")
            tokenizer = load_tokenizer(manifest.decoder_model)
        decoded[kind_plan.kind] = _decode_to_part(manifest, kind_plan, todo, spec, path, model, tokenizer)
    return decoded


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
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=True) as progress:
            task = progress.add_task(f"{kind_plan.kind} shard {spec['shard']}/{spec['num_shards']}",
                                     total=todo.height)
            scorer = FeedbackScorer(model, tokenizer, template, manifest.decoder.batch_tokens) if todo.height else None
            for offset in range(0, todo.height, chunk_rows):
                chunk = todo.slice(offset, chunk_rows)
                scored = []
                for batch in scorer.score(decoder_prompts(chunk, template, tokenizer)):
                    scored += batch
                    progress.advance(task, len(batch))
                scored.sort(key=lambda s: s.index)
                labels = labels_frame(template, chunk["key"].to_list(), scored, manifest.round)
                writer.write_table(labels.to_arrow().cast(schema))
                done_rows, elapsed = offset + chunk.height, time.perf_counter() - start
                if done_rows < todo.height:  # a line a chunk for logs, where the bar does not show
                    rate = done_rows / max(elapsed, 1e-9)
                    console.print(f"{kind_plan.kind} shard {spec['shard']}/{spec['num_shards']}: {done_rows}/"
                                  f"{todo.height} windows, {rate:.1f}/s, ETA {duration((todo.height - done_rows) / rate)}")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    elapsed = time.perf_counter() - start
    console.print(f"{kind_plan.kind}: {todo.height} windows decoded in {elapsed:.1f} s "
                  f"({todo.height / max(elapsed, 1e-9):.1f} examples/s), {kind_plan.reused(spec['shard'])} "
                  f"reused from earlier rounds -> {path}")
    return todo.height


def check_generation(manifest: Manifest, feedback: pl.DataFrame, n: int, seed: int = 0) -> tuple[int, int]:
    """Greedy-generate the answer for ``n`` sampled windows per kind; returns (agreeing, checked)."""
    spec = manifest.decoder_model
    model = load_text_model(spec, "cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(spec)
    all_turns = pl.read_parquet(manifest.run_dir.data.turns)
    agree = checked = 0
    for kind, rows in feedback.partition_by("kind", as_dict=True).items():
        sample = rows.sample(min(n, rows.height), seed=seed)
        turns = all_turns.join(sample.select("game_turn_id", "label"), on="game_turn_id")
        template = decoder_template(manifest.decoder.templates[kind[0]])
        scorer = FeedbackScorer(model, tokenizer, template, manifest.decoder.batch_tokens)
        answers = scorer.generate(decoder_prompts(turns, template, tokenizer))
        words = [None if a is None else template.labels[a] for a in answers]
        agree += sum(w is not None and LABEL_VALUES[w] == label for w, label in zip(words, turns["label"]))
        checked += turns.height
    return agree, checked


def tasks(manifest: Manifest) -> list[Task]:
    n = manifest.decoder.shards
    return [Task(shard_key(s, n), run, (manifest, s, n)) for s in range(n)]


STAGE = Stage("decode", upstream=("ingest",), tasks=tasks, done=done, applies=lambda m: not m.seed_round)
