"""The respect-hpc command in real subprocesses: exit codes, one-line errors, JSON output, the demo."""

import json
import subprocess
import sys
import textwrap

from conftest import game, write_jsonl, write_parquet

from respect_hpc.metrics import METRIC_COLUMNS


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
    good.write_text("experiment: t\nround: 1\ndata: {interactions: [logs.jsonl]}\nmodel: {path: m}\n")
    done = cli("validate", good)
    assert (done.returncode, done.stdout) == (0, "ok\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: t\nround: 1\ndata: {interactions: [logs.jsonl]}\nmodel: {path: m}\n"
                   "cluster: {partition: 'a b'}\n")
    done = cli("validate", bad)
    assert done.returncode == 2
    assert done.stdout == (f"{bad}:5: cluster.partition: unsafe value 'a b': expected letters, digits, '_', '.', "
                           "'-', not starting with '-'\n")


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


def test_demo_runs_its_manifest_end_to_end(tmp_path):
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(textwrap.dedent("""\
        experiment: demo
        round: 2
        workdir: runs
        data: {interactions: [runs/logs/logs.parquet]}
        model: {path: runs/models/tiny}
        """))
    done = cli("demo", manifest, "--games", "40")
    assert done.returncode == 0, done.stderr
    assert "80 synthetic games" in done.stdout and "rows in 80 = rows out 80 + rows quarantined 0" in done.stdout
    assert (tmp_path / "runs" / "demo" / "round-2" / "metrics" / "round_metrics.parquet").is_file()
    rerun = cli("demo", manifest, "--games", "40")  # the logs exist: reused, not regenerated
    assert rerun.returncode == 0 and "synthetic games" not in rerun.stdout
