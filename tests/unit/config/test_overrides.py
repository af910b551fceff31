"""KEY=VALUE overrides: applied through the manifest's schema, a variant by its name, paths against the working
folder, problems naming the override; recorded in the run directory's manifest lock; carried by next-round."""

import json

import pytest
import yaml
from conftest import REPO, cli
from test_manifest import GOOD, problems, write

from respect_hpc.cluster.controller import Controller, read_manifest_lock
from respect_hpc.config.loading import MAX_OVERRIDES, ManifestError, apply_overrides, load_manifest

VARIANTS = GOOD + """\
variants:
  - {name: b-fft, feedback: binary, objective: fft}
  - {name: t-rl, feedback: ternary, objective: rl}
"""


def test_values_land_where_their_dotted_path_says(tmp_path, monkeypatch):
    path = write(tmp_path, VARIANTS)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "d0.jsonl").write_text("")
    monkeypatch.chdir(tmp_path / "elsewhere")
    m = load_manifest(path, overrides=["training.fft.epochs=3", "variants.t-rl.objective=kto", "seeds=[4, 5]",
                                       "variants.0.feedback=ternary", "data.seed_data=d0.jsonl",
                                       "training.preset=code"])
    assert m.training.fft.epochs == 3 and m.training.rl.epochs == 20  # only what the override names
    assert [(v.name, v.feedback, v.objective) for v in m.variants] == [("b-fft", "ternary", "fft"),
                                                                      ("t-rl", "ternary", "kto")]
    assert m.seeds == [4, 5] and m.training.fft.entropy_weight == 0.1  # the preset's value
    assert m.data.seed_data == tmp_path / "elsewhere" / "d0.jsonl"  # relative to the working folder
    assert m.data.interactions == [tmp_path / "logs.jsonl"]  # the file's own paths: relative to the file
    assert load_manifest(path).training.fft.epochs == 20  # the file is as it was


@pytest.mark.parametrize("override, expected", [
    ("training.fft.epochs=abc", "override 'training.fft.epochs=abc': training.fft.epochs: expected an integer, "
                                "got 'abc'"),
    ("training.fft.epoch=3", "override 'training.fft.epoch=3': training.fft.epoch: unknown key (did you mean "
                             "'epochs'?)"),
    ("variants.b-fft.objective=ppo", "override 'variants.b-fft.objective=ppo': variants[0].objective: unknown "
                                     "objective 'ppo': expected one of fft, rl, kto, seed"),
    ("variants.b-kto.objective=kto", "override 'variants.b-kto.objective=kto': variants: no entry named 'b-kto' "
                                     "(named: b-fft, t-rl)"),
    ("training.fft.micro_batch=5", "override 'training.fft.micro_batch=5': training.fft: effective_batch 64 is "
                                   "not a multiple of micro_batch 5"),
    ("seeds.first=1", "override 'seeds.first=1': seeds: expected a list, got {'first': 1}"),
    ("variants.9.name=x", "override 'variants.9.name=x': variants: no entry named '9' (named: b-fft, t-rl)"),
    ("round.x=1", "override 'round.x=1': round: holds a value, not fields"),
    ("epochs", "override 'epochs': expected KEY=VALUE, KEY a dotted path of manifest fields (e.g. "
               "training.fft.epochs=3, variants.b-fft.objective=rl)"),
    ("a..b=1", "override 'a..b=1': expected KEY=VALUE"),
    ("seeds=[1, 2", "override 'seeds=[1, 2': the value is not YAML (quote it)"),
    ("data.seed_data=none.jsonl", "override 'data.seed_data=none.jsonl': data.seed_data: no such file or folder"),
])
def test_a_bad_override_is_named_in_one_line(tmp_path, override, expected):
    path = write(tmp_path, VARIANTS)
    with pytest.raises(ManifestError) as info:
        load_manifest(path, overrides=[override])
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(expected), info.value.problems


def test_file_problems_keep_their_lines_beside_an_override(tmp_path):
    path = write(tmp_path, VARIANTS.replace("round: 1", "round: -1"))
    assert problems(path, overrides=["seeds=[0]", "training.kto.beta=0"]) == [
        "override 'training.kto.beta=0': training.kto.beta: expected a value > 0.0, got 0",
        "2: round: expected a value >= 0, got -1"]


def test_too_many_overrides_are_refused():
    with pytest.raises(ManifestError, match=f"expected at most {MAX_OVERRIDES}"):
        apply_overrides({}, [f"seeds=[{i}]" for i in range(MAX_OVERRIDES + 1)])


def test_the_cli_takes_overrides_and_the_lock_records_them(tmp_path):
    path = write(tmp_path, VARIANTS)
    done = cli("validate", path, "training.fft.epochs=2", "variants.t-rl.feedback=binary")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    bad = cli("validate", path, "training.fft.epochs=-2")
    assert bad.returncode == 2
    assert bad.stdout.strip() == "override 'training.fft.epochs=-2': training.fft.epochs: expected a value >= 1, got -2"
    overrides = ["training.fft.epochs=2"]
    controller = Controller(load_manifest(path, overrides=overrides), source=path, overrides=overrides)
    controller.claim()
    recorded = read_manifest_lock(controller.run_dir.manifest_lock)
    assert recorded["overrides"] == overrides and recorded["manifest"]["training"]["fft"]["epochs"] == 2
    assert json.loads(controller.run_dir.manifest_lock.read_text())["source"] == str(path.resolve())


def test_next_round_writes_the_overrides_into_the_next_manifest(tmp_path):
    path = write(tmp_path, VARIANTS)
    logs = tmp_path / "deployed.jsonl"
    logs.write_text("")
    done = cli("next-round", path, "training.fft.epochs=2", "variants.b-fft.feedback=ternary", "--logs", logs)
    assert done.returncode == 0, done.stderr
    written = yaml.safe_load((tmp_path / "round-round2.yaml").read_text())
    assert written["training"]["fft"]["epochs"] == 2 and written["variants"][0]["feedback"] == "ternary"
    nxt = load_manifest(tmp_path / "round-round2.yaml")
    assert nxt.round == 2 and nxt.training.fft.epochs == 2 and nxt.data.interactions[-1] == logs


def test_demo_takes_overrides_without_a_manifest(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped manifests/demo.yaml
    done = cli("demo", "simulation.games=abc")
    assert done.returncode == 2
    assert "override 'simulation.games=abc': simulation.games: expected an integer, got 'abc'" in done.stderr


def test_flash_attention_in_fp32_is_refused_and_in_bf16_accepted(tmp_path):
    """FlashAttention-2 has no fp32 kernels: the manifest says so before any job; in bf16 it validates (whether
    flash-attn is installed is checked where the model loads, on the GPU node)."""
    path = write(tmp_path, VARIANTS)
    with pytest.raises(ManifestError) as info:
        load_manifest(path, overrides=["model.attention=flash_attention_2", "model.dtype=fp32"])
    assert str(info.value).splitlines() == [
        "override 'model.dtype=fp32': model: attention flash_attention_2 runs in bf16 or fp16, not dtype fp32: set model.dtype, or "
        "attention: sdpa"]
    assert load_manifest(path, overrides=["model.attention=flash_attention_2"]).model.attention == "flash_attention_2"
    assert load_manifest(path).model.attention == "sdpa"
