"""Feedback decoding on a tiny IDEFICS2-8B replica: scoring vs generation, shards, kills, merge, cache."""

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import cli, write_decode_round

import jobs.decode
import jobs.merge
from respect_hpc.config.loading import load_manifest
from respect_hpc.config.schema import ModelSection
from respect_hpc.data.feedback import MergeError, part_name
from respect_hpc.data.logs import ingest
from respect_hpc.domain.prompts import DECODER_TEMPLATES, DecoderTemplate, decoder_template
from respect_hpc.domain.synthetic import synthesize
from respect_hpc.model.chat import decoder_text
from respect_hpc.model.loading import ModelError, load_text_model, load_tokenizer
from respect_hpc.model.scorer import (
    DecoderError,
    FeedbackScorer,
    label_token_ids,
    parse_label,
    shared_prefix_length,
    token_budget_batches,
)


def prompts_of(logs: Path, template: DecoderTemplate, tokenizer, policies=("sft", "bp")) -> list[str]:
    turns = ingest([logs], policies=policies).turns.filter("has_follow_up")
    return [decoder_text(tokenizer, template, t["previous_action"], t["utterance"], t["action"], t["follow_up"])
            for t in turns.iter_rows(named=True)]


def scores(scorer, prompts) -> np.ndarray:
    """Every prompt's label log-probabilities, in prompt order."""
    return np.array([s.logprobs for s in sorted((s for b in scorer.score(prompts) for s in b), key=lambda s: s.index)])


@pytest.fixture(scope="module")
def loaded(taught_decoder):
    spec = ModelSection(path=taught_decoder[0], dtype="fp32")
    return load_text_model(spec), load_tokenizer(spec)


@pytest.fixture(scope="module")
def fresh_logs(tmp_path_factory):
    path = tmp_path_factory.mktemp("fresh") / "logs.parquet"
    synthesize(25, seed=21, policies={"bp": 0.6}, rounds=[0]).write_parquet(path)
    return path


@pytest.mark.parametrize("key", sorted(DECODER_TEMPLATES))
def test_scoring_and_greedy_generation_agree(loaded, fresh_logs, key):
    model, tokenizer = loaded
    template = decoder_template(key)
    prompts = prompts_of(fresh_logs, template, tokenizer)
    scorer = FeedbackScorer(model, tokenizer, template, batch_tokens=2048)
    scored = sorted((s for batch in scorer.score(prompts) for s in batch), key=lambda s: s.index)
    assert [s.index for s in scored] == list(range(len(prompts)))
    generated = scorer.generate(prompts)
    assert [s.label for s in scored] == generated
    if template.window_style == "chat":  # the fixture's decoder was taught the official (chat) windows
        assert len(set(generated)) >= 2  # the fixture exercises more than one label


def test_prefix_cache_gives_the_full_forward_numbers(loaded, fresh_logs):
    """... and hands the cache to forward under the name the installed transformers takes (an old name warns)."""
    import warnings

    model, tokenizer = loaded
    template = decoder_template("respect-ternary@2")
    prompts = prompts_of(fresh_logs, template, tokenizer)[:40]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        runs = {cached: scores(FeedbackScorer(model, tokenizer, template, batch_tokens=4096, prefix_cache=cached),
                               prompts) for cached in (True, False)}
    np.testing.assert_allclose(runs[True], runs[False], atol=1e-4)


def test_token_budget_batches_cover_every_prompt_once():
    lengths = [5, 90, 17, 33, 33, 120, 2, 64]
    batches = token_budget_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 128
        assert lengths[batch[0]] == max(lengths[i] for i in batch)
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # at least one token of each row runs


def test_labels_are_scored_on_the_tokens_idefics2_emits_after_assistant(loaded):
    """After ``Assistant:`` IDEFICS2-8B answers `` Positive.`` = ``▁Pos itive .``: ``▁Pos`` must count."""
    model, tokenizer = loaded
    ids = label_token_ids(tokenizer, ("Positive", "Neutral", "Negative"))
    pieces = [set(tokenizer.convert_ids_to_tokens(i)) for i in ids]
    assert "▁Pos" in pieces[0] and "▁Ne" in pieces[1] and "▁Neg" in pieces[2]
    template = decoder_template("respect-ternary@2")
    prompt = decoder_text(tokenizer, template, None, "the bird", "select C", "no, the other one")
    answer = model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    first = int(answer[0, -3])  # the first token the taught replica emits
    assert tokenizer.convert_ids_to_tokens(first).startswith("▁")  # spaced after the colon, as IDEFICS2-8B's
    assert any(first in i for i in ids)


def test_label_words_the_tokenizer_cannot_tell_apart(loaded):
    _, tokenizer = loaded
    clash = DecoderTemplate("clash", 1, "q", "a", ("Positive", "positive"))
    with pytest.raises(DecoderError, match="label word 'positive' starts with no token of its own"):
        label_token_ids(tokenizer, clash.labels)
    assert parse_label(" Negative.", ("Positive", "Negative")) == 1
    assert parse_label("maybe", ("Positive", "Negative")) is None


def test_model_errors_are_clear(tmp_path, taught_decoder):
    with pytest.raises(ModelError, match=f"model.path: no such folder '{tmp_path / 'none'}'"):
        load_tokenizer(ModelSection(path=tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_text_model(ModelSection(path=tmp_path / "empty"))
    copy = shutil.copytree(taught_decoder[0], tmp_path / "no-template")
    (copy / "chat_template.jinja").unlink()
    config = (copy / "tokenizer_config.json").read_text()
    assert "chat_template" not in config
    with pytest.raises(ModelError, match="has no chat template"):
        load_tokenizer(ModelSection(path=copy))


@pytest.fixture
def round_one(tmp_path, taught_decoder):
    model, logs = taught_decoder
    return tmp_path, write_decode_round(tmp_path, model, [logs])


def test_a_shard_killed_mid_way_leaves_nothing_and_only_it_is_redone(round_one):
    root, manifest = round_one
    slow = write_decode_round(root, load_manifest(manifest).model.path, load_manifest(manifest).data.interactions,
                          chunk_rows=8)
    done = cli("decode", slow, "--shard", "1", "--num-shards", "2")
    assert done.returncode == 0, done.stderr
    assert re.search(r"shard 1/2: \d+/\d+ windows, [\d.]+/s, ETA \d+m\d\ds", done.stderr), done.stderr  # a chunk's line
    parts = root / "runs" / "test" / "feedback"
    part_1 = sorted(parts.glob("*/round-1/" + part_name(1, 2)))
    assert len(part_1) == 2  # binary and ternary
    stamps = [p.stat().st_mtime_ns for p in part_1]

    victim = subprocess.Popen([sys.executable, "-m", "respect_hpc.cli", "decode", str(slow), "--shard", "0",
                               "--num-shards", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in parts.glob(f"*/round-1/.{part_name(0, 2)}.*.tmp")):
        assert victim.poll() is None, "the shard finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not list(parts.glob(f"*/round-1/{part_name(0, 2)}"))  # no partial output under the final name

    rerun = cli("decode", slow)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("is current, skipped") == 2
    assert [p.stat().st_mtime_ns for p in part_1] == stamps
    assert len(list(parts.glob(f"*/round-1/{part_name(0, 2)}"))) == 2
    assert not list(parts.glob("*/round-1/.*.tmp"))
    assert (root / "runs" / "test" / "round-1" / "feedback.parquet").is_file()


def test_merge_refuses_missing_stale_and_duplicated_parts(round_one):
    root, manifest = round_one
    m = load_manifest(manifest)
    assert cli("decode", manifest).returncode == 0
    folder = next((root / "runs" / "test" / "feedback").glob("respect-binary*")) / "round-1"
    first, second = folder / part_name(0, 2), folder / part_name(1, 2)
    keep = second.read_bytes()

    second.unlink()
    with pytest.raises(MergeError, match=f"{second}: missing or unreadable: rerun decode --shard 1 --num-shards 2"):
        jobs.merge.run(m, 2)

    shutil.copy(first, second)
    with pytest.raises(MergeError, match=f"{second}: holds shard 0 of 2, a duplicate of {part_name(0, 2)}"):
        jobs.merge.run(m, 2)

    second.write_bytes(keep)
    jobs.merge.run(m, 2)  # whole again
    turns_path = root / "runs" / "test" / "data" / "turns.parquet"
    turns = pl.read_parquet(turns_path)
    turns.filter(pl.col("game_turn_id") != turns["game_turn_id"][0]).write_parquet(turns_path)
    with pytest.raises(MergeError, match="stale \\(made from other windows, decoder or code\\)"):
        jobs.merge.run(m, 2)


def test_a_second_round_reuses_the_first_rounds_labels(round_one, taught_decoder, tmp_path):
    root, manifest = round_one
    done = cli("decode", manifest, "--check", "30")
    assert done.returncode == 0, done.stderr
    assert "0 reused from earlier rounds" in done.stderr
    report = next(line for line in done.stdout.splitlines() if line.startswith("greedy generation agrees"))
    agree, checked = map(int, report.split(" on ")[1].split(" windows")[0].split("/"))
    assert checked == 60 and agree >= 57  # the check mode's own report; exact agreement is tested above
    first = pl.read_parquet(root / "runs" / "test" / "round-1" / "feedback.parquet")

    new_logs = tmp_path / "round-1-logs.parquet"
    synthesize(20, seed=5, policies={"bp": 0.6}, rounds=[1]).write_parquet(new_logs)
    second_manifest = write_decode_round(root, taught_decoder[0], [taught_decoder[1], new_logs], round_=2)
    (root / "runs" / "test" / "data").rename(root / "runs" / "test" / "data-round-1")  # ingest anew
    done = cli("decode", second_manifest)
    assert done.returncode == 0, done.stderr
    per_kind = first.height // 2
    assert done.stderr.count("reused from earlier rounds") == 4
    reused = [int(line.split(", ")[1].split(" reused")[0]) for line in done.stderr.splitlines()
              if "reused from earlier rounds" in line]
    assert sum(reused) == 2 * per_kind  # each kind reuses every round-0 window, split over its two shards
    second = pl.read_parquet(root / "runs" / "test" / "round-2" / "feedback.parquet")
    assert second.filter(pl.col("round") == 0).sort("kind", "game_turn_id").select("key", "label").equals(
        first.sort("kind", "game_turn_id").select("key", "label"))
    assert set(second["decoded_in_round"]) == {1, 2}
    assert "decoded feedback" in done.stdout


def test_decode_shards_run_with_the_local_executor(round_one):
    root, manifest = round_one
    done = cli("decode", manifest, "--submit", "--executor", "local")
    assert done.returncode == 0, done.stderr
    assert "decode: 2 job(s)" in done.stderr and "(local)" in done.stderr
    assert len(list((root / "runs" / "test" / "feedback").glob("*/round-1/part-*-of-00002.parquet"))) == 4
    assert (root / "runs" / "test" / "logs" / "decode").is_dir()


def test_precomputed_labels_replace_decoding_that_kind(tmp_path, taught_decoder, capsys):
    """decoder.labels.binary in the public feedback_decoder_binary layout: no binary decoding; the labels as given,
    windows without one reported; the ternary kind is still decoded."""
    import jobs.ingest

    model, logs = taught_decoder
    path = write_decode_round(tmp_path, model, [logs], shards=1)
    turns = ingest([logs]).turns.filter("has_follow_up")
    given = turns.select("game_turn_id").with_row_index().with_columns(
        predictions=pl.when(pl.col("index") % 3 == 0).then(-1).otherwise(1),
        labels=pl.lit(1), text=pl.lit("")).drop("index")
    given.slice(1).write_parquet(tmp_path / "binary.parquet")  # the first window has no label
    path.write_text(path.read_text().replace("decoder: {", f"decoder: {{labels: {{binary: {tmp_path / 'binary.parquet'}}}, "))
    m = load_manifest(path)
    jobs.ingest.run(m)
    assert [p.kind for p in jobs.decode.plans(m, 1)] == ["ternary"]  # binary is not decoded
    jobs.decode.run(m, 0, 1)
    capsys.readouterr()
    feedback = jobs.merge.run(m, 1)
    assert f"decoder.labels.binary: 1 of {turns.height} windows have no label" in " ".join(capsys.readouterr().err.split())
    binary = feedback.filter(pl.col("kind") == "binary").sort("game_turn_id")
    expected = given.slice(1).sort("game_turn_id")
    assert binary["game_turn_id"].to_list() == expected["game_turn_id"].to_list()
    assert binary["label"].to_list() == expected["predictions"].to_list()
    assert set(binary["label_word"]) == {"Positive", "Negative"}
    assert feedback.filter(pl.col("kind") == "ternary").height == turns.height  # decoded as before
    assert jobs.merge.done(m) == {"merge"}
    given.with_columns(predictions=pl.lit(0)).write_parquet(tmp_path / "binary.parquet")
    assert not jobs.merge.done(m)  # another file: merge again
    with pytest.raises(MergeError, match=r"decoder.labels.binary '.*binary.parquet': row 1: predictions: expected one "
                                         r"of -1, 1 for binary feedback, got 0"):
        jobs.merge.run(m, 1)
    pl.concat([given, given.head(1)]).write_parquet(tmp_path / "binary.parquet")
    with pytest.raises(MergeError, match="has more than one label"):
        jobs.merge.run(m, 1)


def test_windows_whose_follow_up_is_empty_are_not_decoded_and_are_counted(tmp_path, taught_decoder):
    """The official code drops a window whose follow-up utterance is "" (igl.py); so does decoding here."""
    model, logs = taught_decoder
    games = pl.read_parquet(logs)
    silent = games.head(3).with_columns(chat=pl.col("chat").list.eval(  # every second utterance left empty
        pl.when(pl.int_range(pl.len()) % 2 == 1).then(pl.lit("")).otherwise(pl.element())))
    path = tmp_path / "silent.parquet"
    pl.concat([silent, games.slice(3)]).write_parquet(path)
    turns = ingest([path], policies=None).turns
    expected = turns.filter(pl.col("has_follow_up") & (pl.col("follow_up") == "")).height
    assert expected > 0
    manifest = write_decode_round(tmp_path, model, [path], shards=1)
    done = cli("decode", manifest)
    assert done.returncode == 0, done.stderr
    assert f"{expected} actions whose follow-up utterance is empty are not decoded" in done.stderr
    feedback = pl.read_parquet(tmp_path / "runs" / "test" / "round-1" / "feedback.parquet")
    decoded = set(feedback["game_turn_id"])
    assert decoded and decoded.isdisjoint(
        turns.filter(pl.col("follow_up") == "")["game_turn_id"])
    assert len(decoded) == turns.filter(pl.col("has_follow_up")).height - expected


def test_a_qwen_decoder_reads_chatml_and_its_prefix_cache_gives_the_full_forward_numbers(fresh_logs, tmp_path):
    """A Qwen2.5-VL checkpoint as the decoder: the prompt is ChatML ending with the generation prompt's newline
    (after which Qwen writes its answer), each label counts by its own first token there (``Positive``, no
    space), and scoring with the shared prefix cached gives the numbers of full forwards (text only: the model's
    positions are its 1-D ones on all three mRoPE axes)."""
    from conftest import multimodal_replica

    spec = ModelSection(path=multimodal_replica("qwen2.5-vl", tmp_path / "qwen"), dtype="fp32")
    model, tokenizer = load_text_model(spec), load_tokenizer(spec)
    template = decoder_template("respect-ternary@2")
    prompts = prompts_of(fresh_logs, template, tokenizer)[:24]
    assert prompts[0].startswith("<|im_start|>system\n") and prompts[0].endswith("<|im_end|>\n<|im_start|>assistant\n")
    pieces = [tokenizer.convert_ids_to_tokens(ids) for ids in label_token_ids(tokenizer, template.labels)]
    assert "Positive" in pieces[0] and "Neutral" in pieces[1] and "Negative" in pieces[2]
    runs = {cached: scores(FeedbackScorer(model, tokenizer, template, batch_tokens=4096, prefix_cache=cached), prompts)
            for cached in (True, False)}
    np.testing.assert_allclose(runs[True], runs[False], atol=1e-4)


class Recording(torch.nn.Module):
    """The decoder as the scorer calls it, recording each batch's rows x width; with ``fits`` (tokens) it raises
    CUDA's out-of-memory error above that many tokens, as a GPU too small for the batch does (no GPU here)."""

    def __init__(self, model, fits: int | None = None):
        super().__init__()
        self.inner, self.fits, self.shapes = model, fits, []

    def forward(self, input_ids, **kwargs):
        if self.fits is not None and input_ids.numel() > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.shapes.append(tuple(input_ids.shape))
        return self.inner(input_ids=input_ids, **kwargs)


class Readings:
    """The allocator's readings of a GPU with ``usable`` bytes where a token takes ``per_token`` bytes (CUDA's
    own cannot be read without a GPU)."""

    def __init__(self, usable: int, per_token: int, model: Recording):
        self.free, self.per_token, self.model = usable, per_token, model

    def start(self):
        self.before = len(self.model.shapes)

    def peak(self):
        rows, width = self.model.shapes[self.before]
        return rows * width * self.per_token

    def usable(self):
        return self.free


def test_an_unset_budget_is_sized_to_the_gpu_memory_by_the_first_batch(loaded, fresh_logs):
    """decoder.batch_tokens unset on a GPU: the first batch runs at 8192 tokens and measures the memory a token
    takes; the rest run in batches that fit 80% of the usable memory. The scores are a fixed budget's."""
    from respect_hpc.model.scorer import CPU_BATCH_TOKENS, MEMORY_SHARE, sized_budget

    model, tokenizer = loaded
    template = decoder_template("respect-ternary@2")
    prompts = prompts_of(fresh_logs, template, tokenizer)
    fixed = scores(FeedbackScorer(model, tokenizer, template, batch_tokens=512), prompts)
    recording = Recording(model)
    usable, per_token = 2_500_000, 2_000  # bytes: 1,000 tokens fit in 80%
    scorer = FeedbackScorer(recording, tokenizer, template, memory=Readings(usable, per_token, recording))
    assert scorer.batch_tokens == CPU_BATCH_TOKENS
    sized = scores(scorer, prompts)
    assert scorer.batch_tokens == sized_budget(usable, per_token) == int(MEMORY_SHARE * usable / per_token) == 1_000
    _prefix, first, *rest = recording.shapes  # the shared prefix runs once, on its own
    assert 1_000 < first[0] * first[1] <= CPU_BATCH_TOKENS
    assert rest and all(r * w <= 1_000 for r, w in rest)
    np.testing.assert_allclose(sized, fixed, atol=1e-4)


def test_a_batch_that_runs_out_of_gpu_memory_is_split_and_nothing_is_scored_twice(loaded, fresh_logs):
    model, tokenizer = loaded
    template = decoder_template("respect-ternary@2")
    prompts = prompts_of(fresh_logs, template, tokenizer)[:60]
    fixed = scores(FeedbackScorer(model, tokenizer, template, batch_tokens=512), prompts)
    recording = Recording(model, fits=300)
    scorer = FeedbackScorer(recording, tokenizer, template, batch_tokens=4096)
    np.testing.assert_allclose(scores(scorer, prompts), fixed, atol=1e-4)  # every prompt once, in its place
    assert scorer.batch_tokens < 4096 and all(r * w <= 300 for r, w in recording.shapes)


def test_sized_budgets_stay_under_the_ceiling():
    from respect_hpc.model.scorer import MAX_BATCH_TOKENS, sized_budget

    assert sized_budget(10**6, 10**6) == 1  # a crowded GPU: a prompt a batch
    assert sized_budget(140 * 2**30, 10_000) == MAX_BATCH_TOKENS
    assert sized_budget(20_000 * 1_000, 1_000) == 16_000  # 80% of 20,000 tokens' memory
