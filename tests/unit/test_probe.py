"""The second probe's failure kinds, each fixed at its root, each with new cases beside the probe's own: a run
directory someone else made, stale results called done, untrusted text reaching the terminal, unbounded work
from small input, manifests that validated and failed later, data that should have been refused, tracebacks
where a line was due, and content echoed back. (The interrupted local jobs are in
tests/integration/cluster/test_controller.py: they need real processes.)"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import cli, game, write_jsonl, write_parquet
from PIL import Image

from respect_hpc.cluster.controller import Controller, ControllerError
from respect_hpc.config.loading import ManifestError, load_manifest
from respect_hpc.config.schema import ModelSection
from respect_hpc.core.rundir import RunDir, RunDirError
from respect_hpc.core.text import clip, printable
from respect_hpc.data.logs import IngestError, ingest
from respect_hpc.model.loading import model_fingerprint
from respect_hpc.model.policy_inputs import MAX_IMAGE_PIXELS, image_problem


def manifest(tmp_path: Path, text: str = "", name: str = "round.yaml", round_: int = 1) -> Path:
    """A small valid manifest (a model folder of config and tokenizer files, no weights needed) plus ``text``."""
    (tmp_path / "logs.jsonl").write_text(json.dumps(game("a")) + "\n")
    (tmp_path / "model").mkdir(exist_ok=True)
    for file in ("config.json", "tokenizer_config.json", "generation_config.json"):
        if not (tmp_path / "model" / file).exists():
            (tmp_path / "model" / file).write_text("{}")
    path = tmp_path / name
    path.write_text(f"experiment: probe\nround: {round_}\nworkdir: {tmp_path / 'runs'}\n"
                    "data: {interactions: [logs.jsonl]}\nmodel: {path: model}\n"
                    "variants: [{name: b-fft, feedback: binary, objective: fft}]\n" + text)
    return path


def one_line(done) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout, done.stderr + done.stdout
    lines = (done.stderr or done.stdout).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -- 1. a run directory someone else made -----------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
@pytest.mark.parametrize("folder", ["", "logs"])
def test_a_run_directory_or_its_logs_owned_by_another_user_is_refused(tmp_path, folder):
    run = RunDir(tmp_path / "runs" / "probe")
    (run.root / folder).mkdir(parents=True)
    os.chown(run.root / folder, 65534, 65534)
    (run.root / folder).chmod(0o777)
    with pytest.raises(RunDirError, match=rf"{run.root / folder}: owned by another user \(uid 65534\); a run "
                                          "directory must be yours alone"):
        run.make_private()


@pytest.mark.parametrize("folder", ["", "logs"])
def test_a_run_directory_or_its_logs_open_to_others_is_made_private(tmp_path, folder):
    run = RunDir(tmp_path / "probe")
    (run.root / folder).mkdir(parents=True)
    (run.root / folder).chmod(0o777)
    run.make_private()
    assert (run.root / folder).stat().st_mode & 0o777 == 0o700


# -- 2. stale results called done --------------------------------------------------------------------------
@pytest.mark.parametrize("file, changes", [
    ("chat_template.jinja", True), ("tokenizer_config.json", True), ("preprocessor_config.json", True),
    ("processor_config.json", True), ("generation_config.json", True), ("special_tokens_map.json", True),
    ("README.md", False), ("LICENSE", False), (".gitattributes", False)])
def test_the_fingerprint_covers_what_changes_a_models_behaviour(tmp_path, file, changes):
    spec = ModelSection(path=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    before = model_fingerprint(spec)
    (tmp_path / file).write_text("{'changed': 1}")
    assert (model_fingerprint(spec) != before) == changes


def test_weights_rewritten_in_place_with_the_old_size_and_time_are_noticed(tmp_path):
    spec, memo = ModelSection(path=tmp_path), tmp_path / "memo.json"
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    before = model_fingerprint(spec, memo)
    stat = weights.stat()
    time.sleep(0.01)
    with weights.open("r+b") as handle:  # same size, then the old modification time put back
        handle.write(b"b" * 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns and weights.stat().st_size == stat.st_size
    assert model_fingerprint(spec, memo) != before


def test_training_is_keyed_on_the_images_content_not_their_folder(tmp_path):
    import jobs.train

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (8, 8), 0 if name == "a.png" else 255).save(images / name)
    path = manifest(tmp_path, "seeds: [1]\n")
    path.write_text(path.read_text().replace("data: {interactions: [logs.jsonl]}",
                                             f"data: {{interactions: [logs.jsonl], images: {images}}}"))
    before = jobs.train.task_hash(load_manifest(path), "b-fft", 1)
    moved = tmp_path / "elsewhere"
    shutil.copytree(images, moved)
    path.write_text(path.read_text().replace(str(images), str(moved)))
    assert jobs.train.task_hash(load_manifest(path), "b-fft", 1) == before  # the same images elsewhere
    Image.new("L", (8, 8), 128).save(moved / "a.png")  # one image replaced in place
    assert jobs.train.task_hash(load_manifest(path), "b-fft", 1) != before


# -- 3. untrusted text reaching the terminal ----------------------------------------------------------------
@pytest.mark.parametrize("text, shown", [
    ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"), ("a\rb", "a\\rb"), ("tab\tnewline\n", "tab\tnewline\n"),
    ("[/x] [bold]b[/bold]", "[/x] [bold]b[/bold]")])
def test_text_from_data_is_printed_as_text_with_control_characters_visible(text, shown):
    assert printable(text) == shown


@pytest.mark.parametrize("name", ["[/x]", "[bold]p[/bold]", "$\\frac{1}{0}$", "p\x1b[31m"])
def test_metrics_prompts_errors_and_plots_take_any_policy_name(tmp_path, name):
    logs = write_jsonl(tmp_path / "logs.jsonl", [game("a", policy_name=name, chat=["the \x1b[2Jbird", "no", "yes"])])
    done = cli("metrics", logs, "--policy", name, "--resamples", "50")
    assert done.returncode == 0 and printable(name) in done.stdout, done.stdout + done.stderr
    done = cli("prompts", logs, "--limit", "1")
    assert done.returncode == 0 and "the \\x1b[2Jbird" in done.stdout and "\x1b[2J" not in done.stdout
    missing = tmp_path / f"no-{name.replace('/', '_')}.jsonl"
    assert printable(str(missing)) in one_line(cli("metrics", missing))  # shown as written, never as markup
    done = cli("report", logs, "--out", tmp_path / "report", "--resamples", "50")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report" / "plots" / "success_and_turns.png").is_file()


# -- 4. unbounded work from small input ----------------------------------------------------------------------
def alias_bomb(depth: int = 12) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}]" for i in range(1, depth)]
    return "\n".join(lines) + f"\nsweep: {{learning_rate: *a{depth - 1}}}\n"


@pytest.mark.parametrize("text, message", [
    (alias_bomb(), "(yaml): expands to more than 100,000 values (aliases repeated inside each other)"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "(yaml): nested deeper than 32 levels"),
    ("x: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "nested deeper than 32 levels"),
    ("sweep: {" + ", ".join(f"{key}: [" + ", ".join(str(i) for i in range(1, 11)) + "]"
                            for key in ("lora_r", "lora_alpha", "epochs", "warmup_steps", "beta")) + "}\n",
     "sweep: 1 variants x 100,000 cells x 3 seeds make 300,000 training tasks, more than the limit of 10,000"),
])
def test_small_manifests_that_would_expand_without_bound_are_refused_at_once(tmp_path, text, message):
    path = manifest(tmp_path, text)
    began = time.monotonic()
    with pytest.raises(ManifestError) as refused:
        load_manifest(path)
    assert time.monotonic() - began < 5
    assert any(message in p for p in refused.value.problems), refused.value.problems


@pytest.mark.parametrize("args, option", [
    (["report", "X", "--resamples", "100000000"], "--resamples"), (["report", "X", "--seed", "-1"], "--seed"),
    (["metrics", "X", "--max-turns", "1000"], "--max-turns"), (["ingest", "X", "--out", "o", "--max-turns", "0"],
                                                                "--max-turns"),
    (["synth", "o.parquet", "--games", "1000000000"], "--games"), (["synth", "o.parquet", "--seed", "-3"], "--seed"),
    (["demo", "--rounds", "100"], "--rounds")])
def test_command_line_numbers_are_bounded(args, option):
    done = cli(*args)
    assert done.returncode == 2 and f"Invalid value for '{option}'" in " ".join(done.stderr.replace("│", " ").split())


# -- 5. validated, then failed later or clobbered ------------------------------------------------------------
@pytest.mark.parametrize("old, new, message", [
    ("experiment: probe", "experiment: " + "e" * 300, "experiment: expected at most 64 characters, got 300"),
    ("name: b-fft", "name: " + "v" * 65, "variants[0].name: expected at most 64 characters, got 65"),
    ("round: 1", "round: 123456789012345678901234567890", "round: expected a value <= 10000"),
    ("name: b-fft, feedback: binary, objective: fft}]", "name: B-fft, feedback: binary, objective: fft}, "
     "{name: b-FFT, feedback: binary, objective: fft}]", "variant names repeat (letter case aside"),
    ("round: 1", "round: 1\nsweep: {learning_rate: [1e-4, 1e-4]}", "sweep.learning_rate: values repeat"),
    ("round: 1", "round: 1\nsweep: {" + ", ".join(f"{key}: [0.0123456789]" for key in (
        "learning_rate", "weight_decay", "entropy_weight", "label_smoothing", "lambda_desirable", "lambda_undesirable",
        "negatives_per_5_positives", "lora_dropout", "temperature")) + "}", "a training task's folder name "
     "(<variant>@<cell>) would be"),
    ("round: 1", "round: 0", "round 0 is the seed round, before any deployment: it has no logs"),
])
def test_manifests_that_would_fail_later_are_refused_at_validation(tmp_path, old, new, message):
    path = manifest(tmp_path)
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ManifestError) as refused:
        load_manifest(path)
    assert any(message in p for p in refused.value.problems), refused.value.problems


@pytest.mark.parametrize("inputs", ["logs", "model"])
def test_a_workdir_inside_an_input_folder_is_refused(tmp_path, inputs):
    path = manifest(tmp_path)
    (tmp_path / "logs").mkdir()
    write_jsonl(tmp_path / "logs" / "a.jsonl", [game("a")])
    path.write_text(path.read_text().replace("[logs.jsonl]", "[logs]").replace(
        f"workdir: {tmp_path / 'runs'}", f"workdir: {tmp_path / inputs / 'runs'}"))
    with pytest.raises(ManifestError, match=rf"workdir: the run directory '.*{inputs}/runs/probe' is inside "
                                            r".* its outputs would be read back as inputs"):
        load_manifest(path)


def test_two_manifests_of_one_experiment_and_round_never_share_a_run_directory(tmp_path):
    first, second = manifest(tmp_path, name="a.yaml"), manifest(tmp_path, name="b.yaml")
    Controller(load_manifest(first), source=first).claim()
    Controller(load_manifest(first), source=first).claim()  # the same manifest again: a rerun
    with pytest.raises(ControllerError, match=rf"round 1 here was run from another manifest, {first}; this is "
                                              rf"{second}: give it its own experiment name or workdir"):
        Controller(load_manifest(second), source=second).claim()
    later = manifest(tmp_path, name="c.yaml", round_=2)
    Controller(load_manifest(later), source=later).claim()  # the next round's manifest shares it by design


# -- 6. data that should be refused -------------------------------------------------------------------------
def test_a_turn_given_twice_is_refused_whatever_its_p(tmp_path):
    from respect_hpc.domain.synthetic import synthesize, to_public_turn_layout

    turns = to_public_turn_layout(ingest([write_parquet(tmp_path / "i.parquet",
                                                        synthesize(2, seed=1, policies={"sft": 0.5}).to_dicts())])
                                  .turns)
    twice = pl.concat([turns, turns.head(1).with_columns(prob_action=pl.lit(0.01))])
    path = tmp_path / "turns.parquet"
    twice.write_parquet(path)
    with pytest.raises(IngestError, match=rf"{path}: row {twice.height}: turn_id: turn 0 of the game is given twice"):
        ingest([path])


def test_a_json_record_naming_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "logs.jsonl"
    row = json.dumps(game("a"))
    path.write_text(row + "\n" + row[:-1].replace('"round": 1', '"round": 1, "round": 2') + ', "x": 0}\n'.replace(
        ', "x": 0', ""))
    with pytest.raises(IngestError, match=rf"{path}: row 2: round: given twice in one record"):
        ingest([path])


def test_damaged_and_oversized_images_are_named_before_training(tmp_path):
    good = tmp_path / "good.png"
    Image.new("L", (32, 32)).save(good)
    assert image_problem(good) is None
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    assert image_problem(truncated).startswith("not a readable image")
    (tmp_path / "text.png").write_text("not an image")
    assert image_problem(tmp_path / "text.png").startswith("not a readable image")
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # a few kB on disk, 16M pixels decoded
    assert f"more than {MAX_IMAGE_PIXELS:,}" in image_problem(tmp_path / "bomb.png")


# -- 7. tracebacks where a line was due ----------------------------------------------------------------------
def test_a_manifest_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "manifest.yaml"
    os.mkfifo(fifo)
    assert one_line(cli("validate", fifo)) == f"{fifo}:1: (file): not a regular file"
    assert one_line(cli("plan", fifo)) == f"error: {fifo}:1: (file): not a regular file"


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path):
    path = manifest(tmp_path)
    (tmp_path / "blocker").write_text("a file where a folder would go")
    path.write_text(path.read_text().replace(f"workdir: {tmp_path / 'runs'}", f"workdir: {tmp_path / 'blocker' / 'x'}"))
    with pytest.raises(RunDirError, match=r"cannot create the run directory .*: choose a workdir you can write to"):
        RunDir(load_manifest(path, check_files=False).run_dir.root).make_private()


def test_plan_makes_nothing(tmp_path):
    path = manifest(tmp_path)
    assert cli("plan", path).returncode == 0
    assert not (tmp_path / "runs").exists()


def test_synth_into_a_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    assert one_line(cli("synth", tmp_path / "file" / "out.parquet", "--games", "2")).startswith(
        f"error: {tmp_path / 'file' / 'out.parquet'}: cannot write")


# -- 9. content echoed back -----------------------------------------------------------------------------------
def test_a_profile_that_is_not_yaml_is_never_quoted(tmp_path):
    secret = tmp_path / "secrets.env"
    secret.write_text("TOKEN: [hunter2-secret-value\n  key: 'unclosed\n")
    line = one_line(cli("plan", manifest(tmp_path), "--cluster", secret))
    assert line.startswith(f"error: {secret}:") and "hunter2" not in line


def test_a_huge_refused_value_is_clipped(tmp_path):
    path = manifest(tmp_path, "cluster: {partition: '" + "a;" * 2_500_000 + "'}\n")
    done = cli("validate", path)
    assert done.returncode == 2 and len(done.stdout) < 1000 and "characters)" in done.stdout


def test_clip_keeps_short_values_whole():
    assert clip("gpu; rm -rf /") == "'gpu; rm -rf /'" and clip("x" * 500).endswith("(502 characters)")
