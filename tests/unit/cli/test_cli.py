"""The respect-hpc command: exit codes, one-line errors, JSON output (in this process, typer's CliRunner)."""

import json

import pytest
from conftest import cli, game, write_jsonl, write_parquet

from respect_hpc.report.round_metrics import METRIC_COLUMNS


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


def test_a_checkpoint_of_an_unknown_multimodal_family_is_refused_at_its_line(tmp_path):
    """LLaVA's config (model_type, a vision config) in the model folder: validate names the model type and the
    families known, at model.path's line, before anything is loaded."""
    (tmp_path / "logs.jsonl").write_text("")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {}}))
    manifest = tmp_path / "m.yaml"
    manifest.write_text("experiment: t\nround: 1\ndata: {interactions: [logs.jsonl]}\n\nmodel: {path: m}\n"
                        "variants: [{name: b-fft, feedback: binary, objective: fft}]\n")
    done = cli("validate", manifest)
    assert done.returncode == 2
    assert done.stdout == (f"{manifest}:5: model.path: model type 'llava' is not a multimodal family respect-hpc "
                           "knows; known: idefics2 (idefics2), idefics3 (idefics3, smolvlm), qwen2_vl (qwen2_vl, "
                           "qwen2_5_vl)\n")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "smolvlm", "vision_config": {}}))
    assert cli("validate", manifest).stdout == "ok\n"


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


@pytest.mark.parametrize("args", [["--help"], ["validate", "--help"], ["schema"], ["plan", "--help"]])
def test_help_validate_and_schema_import_neither_torch_nor_transformers(args, tmp_path):
    """Login-node calls stay light; a fresh interpreter, as this one has imported everything by now."""
    import subprocess
    import sys

    code = ("import sys\nfrom respect_hpc.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_validate_of_a_real_manifest_imports_no_torch(tmp_path):
    import subprocess
    import sys

    (tmp_path / "logs.jsonl").write_text("")
    (tmp_path / "m").mkdir()
    (tmp_path / "good.yaml").write_text("experiment: t\nround: 1\ndata: {interactions: [logs.jsonl]}\nmodel: {path: m}\n"
                                        "variants: [{name: b-fft, feedback: binary, objective: fft}]\n")
    code = ("import sys\nfrom respect_hpc.cli import app\ntry:\n    app(['validate', sys.argv[1]])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "good.yaml")], capture_output=True, text=True)
    assert done.stdout.splitlines() == ["ok", "False"], done.stdout + done.stderr
