"""The README's first command: the demo round from nothing, then a rerun that submits nothing."""

import textwrap

from conftest import cli


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
