"""Round manifests: the shipped ones validate; every error kind gives its exact FILE:LINE message."""

import json
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from respect_hpc.config.loading import ManifestError, load_manifest, manifest_json_schema
from respect_hpc.config.schema import SEED_VARIANT

MANIFESTS = REPO / "manifests"


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "logs.jsonl").write_text("")
    (tmp_path / "model").mkdir(exist_ok=True)
    seed_policy = tmp_path / "runs" / "test" / "round-0" / "policies" / "sft"  # the KTO variants continue from it
    seed_policy.mkdir(parents=True, exist_ok=True)
    (seed_policy / "adapter_config.json").write_text("{}")
    path = tmp_path / "round.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
experiment: test
round: 1
data:
  interactions: [logs.jsonl]
model:
  path: model
"""


def problems(path: Path, **options) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **options)
    return [p.removeprefix(f"{path}:") for p in info.value.problems]


def test_minimal_manifest_gets_the_paper_defaults(tmp_path):
    manifest = load_manifest(write(tmp_path, GOOD))
    assert [v.name for v in manifest.variants] == ["b-fft", "t-fft", "b-rl", "t-rl", "b-kto", "t-kto"]
    assert manifest.seeds == [1, 2, 3]
    assert manifest.data.interactions == [tmp_path / "logs.jsonl"]  # resolved against the manifest's folder
    fft, kto = manifest.training.fft, manifest.training.kto
    assert (fft.optimizer, fft.learning_rate, fft.schedule, fft.epochs, fft.warmup_steps, fft.weight_decay,
            fft.effective_batch, fft.entropy_weight) == ("adamw", 1e-4, "cosine", 20, 10, 0.01, 64, 0.01)
    assert (kto.optimizer, kto.learning_rate, kto.schedule, kto.entropy_weight, kto.beta) == (
        "rmsprop", 1e-5, "constant", 0.1, 0.5)
    assert manifest.variants[4].continues and not manifest.variants[0].continues
    assert manifest.cluster.executor == "local" and manifest.cluster.stages["train"].gpus == 0


def test_partial_objective_override_keeps_that_objectives_defaults(tmp_path):
    manifest = load_manifest(write(tmp_path, GOOD + "training:\n  kto: {epochs: 3}\n"))
    assert manifest.training.kto.epochs == 3
    assert manifest.training.kto.optimizer == "rmsprop" and manifest.training.kto.learning_rate == 1e-5


def test_the_code_preset_takes_the_gin_files_values_each_still_overridable(tmp_path):
    paper = load_manifest(write(tmp_path, GOOD)).training
    code = load_manifest(write(tmp_path, GOOD + "training: {preset: code, kto: {lambda_desirable: 2}}\n")).training
    assert paper.preset == "paper" and code.preset == "code"
    for objective in ("fft", "rl"):
        p, c = getattr(paper, objective), getattr(code, objective)
        assert (p.entropy_weight, p.optimizer, p.negatives) == (0.01, "adamw", "per_epoch")
        assert (c.entropy_weight, c.optimizer, c.negatives) == (0.1, "paged_adamw_8bit", "all")
    assert (paper.kto.entropy_weight, paper.kto.lambda_desirable, paper.kto.optimizer) == (0.1, 4.0, "rmsprop")
    assert (code.kto.entropy_weight, code.kto.lambda_desirable, code.kto.optimizer) == (0.01, 2.0, "rmsprop")
    assert (paper.fft.lora_placement, paper.fft.lora_init) == (code.fft.lora_placement, code.fft.lora_init) == (
        "official", "gaussian")  # the adapters' placement and init are the official runs' under either preset
    assert code.in_force("fft") == "preset code: entropy_weight 0.1, optimizer paged_adamw_8bit, negatives all"
    assert paper.in_force("kto") == ("preset paper: entropy_weight 0.1, optimizer rmsprop, negatives per_epoch, "
                                     "lambda_desirable 4.0")


def test_paged_adamw_is_refused_with_one_line_where_it_cannot_run():
    import importlib.util

    import torch

    from respect_hpc.training.spec import TrainingError, check_optimizer

    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        pytest.skip("bitsandbytes and a CUDA device are here: paged AdamW runs")
    with pytest.raises(TrainingError, match=r"^training.fft.optimizer: paged_adamw_8bit needs bitsandbytes and a "
                                            r"CUDA device \(.* here\); set optimizer: adamw to train here$"):
        check_optimizer("paged_adamw_8bit", "training.fft")
    check_optimizer("adamw", "training.fft")


def test_content_hash_is_stable_and_sensitive(tmp_path):
    first = load_manifest(write(tmp_path, GOOD)).content_hash()
    assert load_manifest(write(tmp_path, GOOD)).content_hash() == first
    assert load_manifest(write(tmp_path, GOOD + "seeds: [1, 2]\n")).content_hash() != first


@pytest.mark.parametrize("extra, expected", [
    ("modle: {path: model}\n", ["7: modle: unknown key (did you mean 'model'?)"]),
    ("seeds: [1, two]\n", ["7: seeds[1]: expected an integer, got 'two'"]),
    ("cluster:\n  partition: 'gpu; rm -rf /'\n",
     ["8: cluster.partition: unsafe value 'gpu; rm -rf /': expected letters, digits, '_', '.', '-', "
      "not starting with '-' or '.'"]),
    ("cluster:\n  account: '$(whoami)'\n",
     ["8: cluster.account: unsafe value '$(whoami)': expected letters, digits, '_', '.', '-', not starting with '-' or '.'"]),
    ("cluster:\n  constraint: 'a100`id`'\n",
     ["8: cluster.constraint: unsafe value 'a100`id`': expected feature names (letters, digits, '_', '.', '-') "
      "joined by '&', '|' or ','"]),
    ("variants:\n  - {name: b-ppo, feedback: binary, objective: ppo}\n",
     ["8: variants[0].objective: unknown objective 'ppo': expected one of fft, rl, kto, seed"]),
    ("variants:\n  - {name: x, feedback: unary, objective: fft}\n",
     ["8: variants[0].feedback: unknown feedback 'unary': expected one of binary, ternary"]),
    ("cluster:\n  executor: kubernetes\n",
     ["8: cluster.executor: unknown executor 'kubernetes': expected one of local, slurm, debug"]),
    ("training:\n  fft: {epochs: 0}\n", ["8: training.fft.epochs: expected a value >= 1, got 0"]),
    ("decoder:\n  templates: {binary: respect-ternary@2}\n",
     ["8: decoder.templates: template 'respect-ternary@2' is ternary, not binary"]),
    ("variants:\n  - {name: a, feedback: binary, objective: fft}\n  - {name: a, feedback: binary, objective: rl}\n",
     ["7: variants: variant names repeat (letter case aside, as folder names on some file systems): a"]),
    ("round: 2\n", ["7: round: duplicate key"]),
    # names and numbers that would escape the run directory, reach a shell or overflow later
    ("variants:\n  - {name: ., feedback: binary, objective: fft}\n",
     ["8: variants[0].name: unsafe value '.': expected letters, digits, '_', '.', '-', not starting with '-' or '.'"]),
    ("decoder: {shards: 99999999999999999999999}\n",
     ["7: decoder.shards: expected a value <= 100000, got 99999999999999999999999"]),
    ("seeds: [-1]\n", ["7: seeds[0]: expected a value >= 0, got -1"]),
    ("seeds: [12345678901234567890]\n", ["7: seeds[0]: expected a value <= 2147483647, got 12345678901234567890"]),
    ("training:\n  rl: {effective_batch: 10, micro_batch: 4}\n",
     ["8: training.rl: effective_batch 10 is not a multiple of micro_batch 4"]),
    ("decoder: {shards: true}\n", ["7: decoder.shards: expected an integer, got true"]),
    ("training:\n  fft: {learning_rate: .inf}\n", ["8: training.fft.learning_rate: expected a finite number, got inf"]),
    ("simulation: {kilogram: kg, max_turns: 20}\n",
     ["7: simulation: max_turns 20 is more than data.max_turns 10, the turn limit the round's ingest holds the "
      "deployed games to: raise data.max_turns"]),
])
def test_manifest_errors(tmp_path, extra, expected):
    assert problems(write(tmp_path, GOOD + extra)) == expected


def test_missing_fields_and_wrong_types(tmp_path):
    path = write(tmp_path, "experiment: test\nround: first\ndata: {}\n")
    assert problems(path) == [
        "1: model: required field missing",
        "2: round: expected an integer, got 'first'",
    ]


def test_a_manifest_without_logs_is_the_seed_round(tmp_path):
    seed_round = "experiment: test\nround: 0\ndata: {seed_data: logs.jsonl}\nmodel:\n  path: model\n"
    manifest = load_manifest(write(tmp_path, seed_round))
    assert manifest.seed_round and manifest.variants == [SEED_VARIANT] and SEED_VARIANT.name == "sft"
    seed = manifest.objective(SEED_VARIANT)
    assert (seed.epochs, seed.schedule, seed.warmup_steps, seed.learning_rate) == (40, "constant", 0, 1e-4)
    assert problems(write(tmp_path, seed_round.replace("round: 0", "round: 2"))) == [
        "1: (top level): data.interactions: round 2 needs the interaction logs of the rounds so far; only round 0, "
        "the seed round, trains without them"]
    assert problems(write(tmp_path, seed_round.replace("{seed_data: logs.jsonl}", "{}"))) == [
        "1: (top level): data.seed_data: the seed round trains on D_0: name it"]
    assert problems(write(tmp_path, seed_round + "variants: [{name: b-fft, feedback: binary, objective: fft}]\n")) \
        == ["1: (top level): variants: the seed round (no data.interactions) trains the seed policy alone; leave "
            "variants out"]
    assert problems(write(tmp_path, GOOD + "variants: [{name: s, feedback: binary, objective: seed}]\n")) == [
        "1: (top level): variants: objective seed (s) belongs to the seed round, a manifest without "
        "data.interactions"]


def test_missing_files_are_named(tmp_path):
    path = write(tmp_path, GOOD.replace("logs.jsonl", "nowhere.jsonl") + "datas: 1\n")
    assert problems(path) == ["7: datas: unknown key (did you mean 'data'?)"]
    path = write(tmp_path, GOOD.replace("logs.jsonl", "nowhere.jsonl").replace("path: model", "path: gone"))
    assert problems(path) == [
        f"4: data.interactions[0]: no such file or folder '{tmp_path / 'nowhere.jsonl'}'",
        f"6: model.path: no such file or folder '{tmp_path / 'gone'}'",
    ]
    assert load_manifest(path, check_files=False).model.path == tmp_path / "gone"


def test_kto_needs_the_adapter_it_continues_from(tmp_path):
    text = GOOD.replace("round: 1", "round: 0") + "variants:\n  - {name: b-kto, feedback: binary, objective: kto}\n"
    assert problems(write(tmp_path, text)) == [
        "7: variants: variant b-kto continues from the previous round, but round 0 has none: "
        "set init: base or previous_adapter"]
    text = GOOD + "variants:\n  - {name: b-fft, feedback: binary, objective: fft}\n" \
                  "  - {name: b-kto, feedback: binary, objective: kto}\n"
    path = write(tmp_path, text)
    (tmp_path / "runs/test/round-0/policies/sft/adapter_config.json").unlink()
    assert problems(path) == [
        "9: variants[1].init: continues from round 0's selected policy, but "
        f"'{tmp_path}/runs/test/round-0/policies/sft' holds no adapter: run that round, set previous_adapter, "
        "or init: base"]
    assert load_manifest(path, check_files=False).variants[1].continues  # a cluster manifest checked elsewhere


def test_names_that_escape_the_run_directory_and_paths_that_reach_sbatch(tmp_path):
    assert problems(write(tmp_path, GOOD.replace("experiment: test", "experiment: '..'"))) == [
        "1: experiment: unsafe value '..': expected letters, digits, '_', '.', '-', not starting with '-' or '.'"]
    found = problems(write(tmp_path, GOOD + 'workdir: "runs\\n#SBATCH --partition=stolen"\n'))
    assert len(found) == 1 and found[0].startswith("7: workdir: path '") and found[0].endswith(
        "runs\\n#SBATCH --partition=stolen' holds control characters '\\n'")
    (tmp_path / "afile").write_text("")
    assert problems(write(tmp_path, GOOD + "workdir: afile\n")) == [
        f"7: workdir: expected a folder, got a file '{tmp_path / 'afile'}'"]


def test_relative_paths_become_absolute_whatever_the_current_folder(tmp_path, monkeypatch):
    write(tmp_path, GOOD + "workdir: runs\n")
    monkeypatch.chdir(tmp_path)
    m = load_manifest("round.yaml")
    assert m.workdir == tmp_path / "runs" and m.model.path == tmp_path / "model"
    assert m.data.interactions == [tmp_path / "logs.jsonl"]


def test_a_manifest_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"experiment: test\nround: 1\nworkdir: caf\xe9\n")
    assert problems(path) == ["3: (file): not UTF-8 text (byte 0xe9 at offset 38)"]


def test_yaml_syntax_error_names_the_line(tmp_path):
    assert problems(write(tmp_path, GOOD + "seeds: [1, 2\n")) == ["8: (yaml): expected ',' or ']', but got '<stream end>'"]


def test_shipped_manifests_validate():
    paper = load_manifest(MANIFESTS / "paper-b-fft-round1.yaml", check_files=False)
    assert [v.name for v in paper.variants] == ["b-fft"] and paper.cluster.executor == "slurm"
    assert paper.model.dtype == "bf16" and paper.cluster.stages["train"].gpus == 4
    assert paper.variants[0].policies == ["sft", "bp"]
    for name in ("paper-b-fft-round1.yaml", "paper-seed-round0.yaml"):  # each names its preset
        assert "\n  preset: paper" in (MANIFESTS / name).read_text()
        assert load_manifest(MANIFESTS / name, check_files=False).training.preset == "paper"
    smolvlm = load_manifest(MANIFESTS / "smolvlm-b-fft-round1.yaml", check_files=False)
    assert smolvlm.model.path.name == "SmolVLM-Instruct" and smolvlm.decoder_model.path.name == "idefics2-8b"
    demo = load_manifest(MANIFESTS / "demo.yaml", check_files=False)
    assert demo.cluster.executor == "local" and demo.simulation is not None
    assert demo.data.images == demo.simulation.kilogram / "tangram_pngs"
    for name in ("paper-seed-round0.yaml", "demo.yaml", "sim.yaml"):
        seed_round = load_manifest(MANIFESTS / name, check_files=False)
        assert seed_round.seed_round and [v.name for v in seed_round.variants] == ["sft"]
    sim = load_manifest(MANIFESTS / "sim.yaml", check_files=False)
    assert sim.seed_round and sim.simulation.kilogram.name == "kilogram"
    assert (sim.simulation.games, sim.simulation.control_games, sim.simulation.descriptions) == (400, 1200, 2)
    assert sim.simulation.order == "fixed" and sim.training.image_order == "logged"
    assert (sim.simulation.pool, sim.simulation.credit) == ("all", "asked")
    assert sim.data.images == sim.simulation.kilogram / "tangram_pngs"


def test_json_schema_describes_the_sections():
    schema = manifest_json_schema()
    assert {"experiment", "round", "data", "model", "variants", "seeds", "training", "cluster"} <= set(
        schema["properties"])
    json.dumps(schema)


def test_simulated_games_may_be_as_long_as_the_ingest_takes(tmp_path):
    text = GOOD.replace("data:\n", "data:\n  max_turns: 20\n") + "simulation: {kilogram: kg, max_turns: 20}\n"
    manifest = load_manifest(write(tmp_path, text), check_files=False)
    assert manifest.simulation.max_turns == manifest.data.max_turns == 20


def test_the_simulation_section_describes_the_speaker_of_deployments_and_of_d0(tmp_path):
    from respect_hpc.domain.simulator import SpeakerSettings

    text = GOOD + "simulation: {kilogram: kg, implicit: 0.1, undo: 0.5, credit: asked, order: fixed}\n"
    sim = load_manifest(write(tmp_path, text), check_files=False).simulation
    assert sim.speaker_settings() == SpeakerSettings(implicit=0.1, undo=0.5, credit="asked", order="fixed")
    assert sim.speaker_settings(pool="seed") == SpeakerSettings(implicit=0.1, undo=0.5, credit="asked",
                                                                order="fixed", pool="seed")
