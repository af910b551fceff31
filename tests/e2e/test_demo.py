"""The README's first command: the demo (the quick simulated setting, scaled down further here through
KEY=VALUE overrides) from nothing to round 1's verdict against the control, then a rerun that submits
nothing. Whether the trained policy beats the control at the shipped size is measured by `make demo` and
recorded in benchmarks/RESULTS.md (benchmarks/bench_demo.py); this test checks the whole path and its summary."""

import polars as pl
import pytest
import yaml
from conftest import KILOGRAM, REPO, cli
from peft import PeftModel
from transformers import AutoModelForImageTextToText


def test_the_demo_runs_the_seed_round_and_round_one_and_says_what_it_shows(tmp_path):
    if not (KILOGRAM / "dense.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}: the simulator speaks its descriptions")
    manifest = tmp_path / "manifests" / "demo.yaml"  # next-round writes demo-round1.yaml beside it
    manifest.parent.mkdir()
    manifest.write_text((REPO / "manifests" / "demo.yaml").read_text())
    inputs = tmp_path / "inputs"
    small = [f"workdir={tmp_path / 'runs'}", f"data.images={KILOGRAM / 'tangram_pngs'}",
             f"simulation.kilogram={KILOGRAM}", "--variants", REPO / "manifests" / "demo-variants.yaml", f"data.seed_data={inputs / 'd0.parquet'}",
             f"data.validation={inputs / 'validation.parquet'}", f"model.path={inputs / 'policy'}",
             f"decoder.model.path={inputs / 'decoder'}", "simulation.games=12", "simulation.control_games=12",
             "simulation.teach_steps=20", "training.seed.epochs=1", "training.fft.epochs=1", "validation.turns=8"]
    done = cli("demo", manifest, *small)
    assert done.returncode == 0, done.stderr
    for shown in ("simulated deployments of demo, rounds 0 to 1", "decoded feedback against the simulator's truth",
                  "round 1: b-fft succeeds in", "the control (the seed policy) in", "on the 12 games both played",
                  "simulated: the speaker is a "
                  "program"):
        assert shown in " ".join(done.stdout.split()), shown
    run = tmp_path / "runs" / "demo"
    assert (run / "round-1" / "policies" / "b-fft" / "adapter_model.safetensors").is_file()
    assert (run / "learning_curve.parquet").is_file()
    rerun = cli("demo", manifest, *small)  # every task done: nothing submitted
    assert rerun.returncode == 0 and "every task is done: nothing submitted" in rerun.stderr

    # the run in the public release's layout: PEFT loads the adapter; the dataset card's configs read back
    exported = cli("export", run, "--out", tmp_path / "export")
    assert exported.returncode == 0, exported.stderr
    adapter = tmp_path / "export" / "adapters" / "b-fft-round-1"
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "| round | 1 |" in card and "| preset | paper |" in card
    base = AutoModelForImageTextToText.from_pretrained(inputs / "policy")
    loaded = PeftModel.from_pretrained(base, adapter)
    exported_b = {n: p for n, p in loaded.named_parameters() if "lora_B" in n}
    assert exported_b and any(p.abs().sum() > 0 for p in exported_b.values())  # trained, not a fresh adapter
    dataset = tmp_path / "export" / "dataset"
    front = yaml.safe_load((dataset / "README.md").read_text().split("---")[1])
    configs = {c["config_name"]: c["data_files"][0]["path"] for c in front["configs"]}
    assert set(configs) == {"interaction", "feedback_decoder_binary"}
    games = pl.read_parquet(dataset / configs["interaction"])
    assert set(games["policy_name"]) == {"sft", "b-fft", "control"} and games["game_id"].is_unique().all()
    labels = pl.read_parquet(dataset / configs["feedback_decoder_binary"])
    assert set(labels["predictions"].unique()) <= {-1, 1} and labels.height > 0
