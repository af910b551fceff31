"""The respect-hpc command in real subprocesses: exit codes, one-line errors, JSON output, the demo."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import game, write_jsonl, write_parquet

from respect_hpc.report.round_metrics import METRIC_COLUMNS


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "respect_hpc.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_help_explains_every_command():
    out = cli("--help").stdout
    for command in ("validate", "schema", "ingest", "metrics", "synth", "demo"):
        assert command in out


def test_validate_ok_and_problems(tmp_path):
    (tmp_path / "logs.jsonl").write_text("")
    (tmp_path / "m").mkdir()
    good = tmp_path / "good.yaml"
    good.write_text("experiment: t\nround: 1\ndata: {interactions: [logs.jsonl]}\nmodel: {path: m}\n"
                    "variants: [{name: b-fft, feedback: binary, objective: fft}]\n")
    done = cli("validate", good)
    assert (done.returncode, done.stdout) == (0, "ok\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: t\nround: 1\ndata: {interactions: [logs.jsonl]}\nmodel: {path: m}\n"
                   "cluster: {partition: 'a b'}\n")
    done = cli("validate", bad)
    assert done.returncode == 2
    assert done.stdout == (f"{bad}:5: cluster.partition: unsafe value 'a b': expected letters, digits, '_', '.', "
                           "'-', not starting with '-' or '.'\n")


def test_schema_is_json():
    assert "properties" in json.loads(cli("schema").stdout)


def test_ingest_writes_tables_and_reports_quarantine(tmp_path):
    src = write_parquet(tmp_path / "logs.parquet", [game("a"), game("b", policy_name="nobody"), game("c")])
    done = cli("ingest", src, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {src}: row 2: policy_name: unknown policy 'nobody': expected one of "
                                   "ba, bk, bp, human, sft, ta, tk, tp")
    done = cli("ingest", src, "--out", tmp_path / "out", "--quarantine")
    assert done.returncode == 0, done.stderr
    assert "rows in 3 = rows out 2 + rows quarantined 1" in done.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"interactions.parquet", "turns.parquet",
                                                              "quarantine.parquet"}
    done = cli("ingest", src, "--out", tmp_path / "out2", "--policy", "nobody")
    assert done.returncode == 0 and "3 games, 9 turns" in done.stdout


def test_metrics_json_lines(tmp_path):
    src = write_jsonl(tmp_path / "logs.jsonl", [game("a"), game("b", round=2), game("c", policy_name="sft")])
    done = cli("metrics", src, "--json", "--resamples", "500")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["policy"], r["round"]) for r in rows] == [("bp", 1), ("bp", 2), ("sft", 1)]
    assert all(list(r) == list(METRIC_COLUMNS) for r in rows)
    assert "success" in cli("metrics", src).stdout


@pytest.mark.parametrize("args, message", [
    (["--resamples", "0"], "Invalid value for '--resamples': Input should be greater than or equal to 1"),
    (["--resamples", "-5"], "Invalid value for '--resamples': Input should be greater than or equal to 1"),
    (["--seed", "-1"], "Invalid value for '--seed': Input should be greater than or equal to 0"),
])
def test_metrics_options_out_of_range_are_refused(tmp_path, args, message):
    done = cli("metrics", write_jsonl(tmp_path / "logs.jsonl", [game("a")]), *args)
    assert done.returncode == 2 and message in " ".join(done.stderr.replace("│", " ").split())
    assert "Traceback" not in done.stderr


def test_ingest_out_onto_a_file_and_non_utf8_logs_are_refused_in_one_line(tmp_path):
    src = write_jsonl(tmp_path / "logs.jsonl", [game("a")])
    (tmp_path / "taken").write_text("mine")
    done = cli("ingest", src, "--out", tmp_path / "taken")
    assert done.returncode == 2 and "exists and is a file" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "taken").read_text() == "mine"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"game_id": "\xff"}\n')
    for command in (["ingest", bad, "--out", tmp_path / "out"], ["metrics", bad]):
        done = cli(*command)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"{bad}: row 1: line: not UTF-8 text (byte 0xff at column 14)" in done.stderr


def test_empty_inputs_are_refused_not_reported_as_zero_games(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for command in (["ingest", empty, "--out", tmp_path / "out"], ["metrics", empty]):
        done = cli(*command)
        assert done.returncode == 2 and f"{empty}: no rows: expected games" in done.stderr
    assert not (tmp_path / "out").exists()


def test_demo_runs_a_whole_round_then_a_rerun_submits_nothing(tmp_path):
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(textwrap.dedent("""\
        experiment: demo
        round: 1
        workdir: runs
        data: {interactions: [runs/logs/logs.parquet], seed_data: runs/logs/d0.parquet,
               validation: runs/logs/validation.parquet, images: runs/images}
        model: {path: runs/models/tiny, dtype: fp32}
        variants: [{name: b-fft, feedback: binary, objective: fft}]
        seeds: [1]
        training: {fft: {epochs: 1, effective_batch: 8, micro_batch: 4}, zero_stage: null}
        """))
    done = cli("demo", manifest, "--games", "12")
    assert done.returncode == 0, done.stderr
    assert "12 synthetic games" in done.stdout
    for title in ("decoded feedback", "selected checkpoints", "round metrics"):
        assert title in done.stdout
    run = tmp_path / "runs" / "demo" / "round-1"
    assert (run / "policies" / "b-fft" / "adapter_model.safetensors").is_file()
    assert (run / "metrics" / "round_metrics.parquet").is_file()
    rerun = cli("demo", manifest, "--games", "12")  # inputs exist: reused; every task done: nothing submitted
    assert rerun.returncode == 0 and "synthetic games" not in rerun.stdout
    assert "every task is done: nothing submitted" in rerun.stderr


def test_run_refuses_a_round_without_validation_games(tmp_path):
    src = write_jsonl(tmp_path / "logs.jsonl", [game("a")])
    (tmp_path / "model").mkdir()
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"experiment: x\nround: 1\nworkdir: {tmp_path}\ndata: {{interactions: [{src}]}}\n"
                        f"model: {{path: {tmp_path / 'model'}}}\n"
                        "variants: [{name: b-fft, feedback: binary, objective: fft}]\n")
    done = cli("run", manifest)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("error: data.validation: required to train (human-human games "
                                                    "for checkpoint selection); the round has 3 training tasks")
