"""The deploy stage: a selected policy (IDEFICS2-8B replica + a saved LoRA adapter) plays simulated games on the
real KiloGram tangrams; the logs ingest as the public interaction layout, p is the probability the policy gave
each action as it sampled, the shards are seeded and resumable, and the plan runs deploy and collect after
select."""

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import KILOGRAM, cli, round_inputs

import jobs.collect
import jobs.deploy
from respect_hpc.cluster.plan import build
from respect_hpc.config.loading import load_manifest
from respect_hpc.data.logs import ingest
from respect_hpc.model.loading import load_policy


def seed_round(root, kilogram, simulation):
    inputs = round_inputs(root, 4)
    manifest = root / "seed.yaml"
    manifest.write_text(f"""experiment: sim
round: 0
workdir: {root / 'runs'}
data: {{seed_data: {inputs['d0']}, validation: {inputs['validation']}, images: {kilogram / 'tangram_pngs'}}}
model: {{path: {inputs['model']}, dtype: fp32}}
seeds: [1]
training: {{zero_stage: null}}
simulation: {{kilogram: {kilogram}, {simulation}}}
""")
    m = load_manifest(manifest)
    policy = m.run_dir.policy(0, "sft")  # what the select stage exports: a LoRA adapter
    load_policy(m.model, seed=3).save_pretrained(policy)
    return m


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    if not (KILOGRAM / "dense.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}: the simulator speaks its descriptions")
    root = tmp_path_factory.mktemp("deploy")
    m = seed_round(root, KILOGRAM, "games: 6, shards: 2, batch: 4, max_turns: 4, decoding: constrained")
    for shard in range(2):
        assert jobs.deploy.run(m, shard, 2) == {"sft": 3}
    return m, jobs.collect.run(m, 2)


def test_official_decoding_clicks_the_first_image_when_unparseable_and_logs_full_vocabulary_p(tmp_path):
    """simulation.decoding: official, as the official bots: the legal tokens without a grammar (a random policy
    often says nothing parseable: the first image is clicked), p of the generated tokens under the raw
    full-vocabulary softmax, which a teacher-forced pass over the logged action through an end token gives
    for a single click (and, for a fallback click, the official annotation's p of that click)."""
    from respect_hpc.data.datasets import with_history
    from respect_hpc.domain.prompts import policy_template
    from respect_hpc.model.loading import load_encoder
    from respect_hpc.model.policy_inputs import policy_view

    if not (KILOGRAM / "dense.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}: the simulator speaks its descriptions")
    m = seed_round(tmp_path, KILOGRAM, "games: 4, shards: 1, batch: 4, max_turns: 4")
    assert m.simulation.decoding == "official"
    jobs.deploy.run(m, 0, 1)
    jobs.collect.run(m, 1)
    turns = with_history(ingest([m.run_dir.deployed(0)]).turns).to_dicts()
    assert all(row["action"] for row in turns)  # every turn clicked something
    encoder = load_encoder(m.model, m.data.images)
    template = policy_template(m.policy_template)
    model = load_policy(m.model, adapter=m.run_dir.policy(0, "sft")).eval()
    ends = sorted({encoder.end_id, encoder.tokenizer.eos_token_id})
    single = [row for row in turns if len(row["action"].split()) == 2]
    assert single
    for row in single[:8]:
        view = policy_view(row, template)
        prompt = encoder.prompt_ids(view)
        action = encoder.tokenizer(" " + row["action"], add_special_tokens=False)["input_ids"]
        images = encoder.image_batch([view.images])
        found = []
        for end in ends:
            ids = torch.tensor([prompt + action + [end]])
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=images["pixel_values"],
                               pixel_attention_mask=images["pixel_attention_mask"]).logits[0]
            logp = logits[len(prompt) - 1:-1].log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).sum()
            found.append(float(logp.exp()))
        # float32, batched generation padded on the left against one unpadded pass
        assert any(row["prob_action"] == pytest.approx(p, rel=1e-3) for p in found), (row["action"], found)


def test_the_official_bot_clicks_what_a_state_agnostic_action_names():
    """A parsed action's letters are clicks that toggle (deselecting an unselected image selects it); an
    action that names nothing gets None (the bot then clicks the first image)."""
    from respect_hpc.domain.multiref import Action

    assert jobs.deploy.executable(Action(deselect=frozenset("BC")), ["C"]) == Action(deselect=frozenset("C"),
                                                                                     select=frozenset("B"))
    assert jobs.deploy.executable(Action(select=frozenset("A")), []) == Action(select=frozenset("A"))
    assert jobs.deploy.executable(Action(), ["A"]) is None


def test_deployed_games_ingest_as_the_public_layout_with_p(deployed):
    m, games = deployed
    turns = ingest([m.run_dir.deployed(0)]).turns
    assert games.height == 6 and set(games["policy_name"]) == {"sft"} and set(games["round"]) == {0}
    assert turns.height == games["turn"].sum() and turns["game_id"].n_unique() == 6
    p = turns["prob_action"]
    assert p.is_not_null().all() and ((p > 0) & (p <= 1)).all()
    truth = pl.read_parquet(m.run_dir.deployed_truth(0))
    assert truth.height == turns.height and set(truth["truth"]) <= {-1, 0, 1}
    # constrained generation: every action is legal in its state, so every turn clicked something
    assert (turns["action"] != "").all() and (truth["truth"] != 0).all()
    assert jobs.collect.done(m) == {"collect"}
    assert jobs.deploy.done(m) == {"shard-00000-of-00002", "shard-00001-of-00002"}


def test_shards_are_seeded_and_a_current_part_is_skipped(deployed, tmp_path):
    m, games = deployed
    part = m.run_dir.deploy_part(0, 1, 2)
    before = part.stat().st_mtime_ns
    assert jobs.deploy.run(m, 1, 2) == {}  # current: skipped
    assert part.stat().st_mtime_ns == before
    part.unlink()
    assert jobs.deploy.run(m, 1, 2) == {"sft": 3}
    assert jobs.collect.run(m, 2).equals(games)  # the same games again


def test_p_is_the_probability_the_policy_gave_the_action_as_it_sampled(deployed):
    """p equals a teacher-forced pass over the generated tokens with generation's processor applied at each
    step (legal tokens only, constrained to the legal actions of the state), ending with either end token;
    batched generation pads prompts on the left, hence the tolerance."""
    from respect_hpc.data.datasets import with_history
    from respect_hpc.domain.multiref import letters_of
    from respect_hpc.domain.prompts import policy_template
    from respect_hpc.model.generation import ActionLogits, GameState, legal_token_ids
    from respect_hpc.model.loading import load_encoder
    from respect_hpc.model.policy_inputs import policy_view

    m, _ = deployed
    turns = with_history(ingest([m.run_dir.deployed(0)]).turns).to_dicts()
    encoder = load_encoder(m.model, m.data.images)
    template = policy_template(m.policy_template)
    model = load_policy(m.model, adapter=m.run_dir.policy(0, "sft")).eval()
    legal = legal_token_ids(encoder, policy_view(turns[0], template))
    ends = sorted({encoder.end_id, encoder.tokenizer.eos_token_id})
    # the logs keep the action as its clicks give it (letters sorted): one click has one token order
    single = [row for row in turns if len(row["action"].split()) == 2]
    assert len(single) >= 3
    for row in single[:10]:
        view = policy_view(row, template)
        prompt = encoder.prompt_ids(view)
        state = GameState(10, frozenset(letters_of(row["currently_selected"], row["context"])))
        action = encoder.tokenizer(" " + row["action"], add_special_tokens=False)["input_ids"]
        images = encoder.image_batch([view.images])
        found = []
        for end in ends:
            ids = torch.tensor([prompt + action + [end]])
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=images["pixel_values"],
                               pixel_attention_mask=images["pixel_attention_mask"]).logits[0]
            steps = ActionLogits(encoder.tokenizer, legal, set(ends), len(prompt), [state])
            logp = sum(steps(ids[:, :len(prompt) + k], logits[len(prompt) + k - 1:len(prompt) + k])
                       .log_softmax(-1)[0, token].item() for k, token in enumerate(action + [end]))
            found.append(float(torch.tensor(logp).exp()))
        assert any(row["prob_action"] == pytest.approx(p, rel=1e-4) for p in found), (row["action"], found)


def test_the_plan_deploys_after_selection_only_with_a_simulation_section(deployed, tmp_path):
    m, _ = deployed
    assert [s.name for s in build(m)] == ["train", "select", "deploy", "collect"]
    assert [t.key for t in build(m)[2].tasks] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    plain = m.model_copy(update={"simulation": None})
    assert [s.name for s in build(plain)] == ["train", "select"]


def test_next_round_writes_a_manifest_that_continues_the_lineage(deployed, tmp_path):
    m, _ = deployed
    seed = tmp_path / "seed.yaml"
    seed.write_text((Path(m.data.seed_data).parent / "seed.yaml").read_text())
    variants = tmp_path / "variants.yaml"
    variants.write_text("[{name: b-fft, feedback: binary, objective: fft, policies: [sft]},\n"
                        " {name: b-kto, feedback: binary, objective: kto, previous_adapter: /nowhere}]\n")
    logs = m.run_dir.deployed(0)
    done = cli("next-round", seed, "--logs", logs, "--variants", variants)
    assert done.returncode == 0, done.stderr
    one = load_manifest(tmp_path / "seed-round1.yaml")
    assert one.round == 1 and one.data.interactions == [logs]
    assert [(v.name, v.policies, v.previous_adapter) for v in one.variants] == [
        ("b-fft", ["sft", "b-fft"], None), ("b-kto", None, None)]
    load_policy(m.model, seed=4).save_pretrained(m.run_dir.policy(1, "b-kto"))  # as round 1 selects it
    again = cli("next-round", tmp_path / "seed-round1.yaml", "--logs", logs)
    assert again.returncode == 0, again.stderr
    two = load_manifest(tmp_path / "seed-round2.yaml")
    assert two.round == 2 and two.data.interactions == [logs, logs]
    assert [v.policies for v in two.variants] == [["sft", "b-fft"], None]
    bad = cli("next-round", seed, "--logs", tmp_path / "none.parquet")
    assert bad.returncode == 2 and bad.stderr.strip().endswith(f"--logs: no file {tmp_path / 'none.parquet'}")
    variants.write_text("[{name: b-fft, feedback: binary, objective: fast}]")
    bad = cli("next-round", seed, "--logs", logs, "--variants", variants)
    assert bad.returncode == 2 and "variants.yaml:1: [0].objective: unknown objective 'fast'" in bad.stderr


def test_loop_chains_rounds_through_simulated_deployments_and_resumes(tmp_path):
    if not (KILOGRAM / "dense.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}: the simulator speaks its descriptions")
    from respect_hpc.simulation.teaching import teach_label_words

    m = seed_round(tmp_path, KILOGRAM, "games: 4, control_games: 6, max_turns: 3")
    teach_label_words(m.model.path, ingest([m.data.seed_data]).turns)  # the decoder answers with label words
    manifest = tmp_path / "seed.yaml"
    manifest.write_text(manifest.read_text().replace("training: {zero_stage: null}", """training:
  zero_stage: null
  seed: {epochs: 1, effective_batch: 8, micro_batch: 4}
  fft: {epochs: 1, effective_batch: 8, micro_batch: 4}"""))
    shutil.rmtree(tmp_path / "runs")  # nothing selected yet: the loop trains the seed policy itself
    variants = tmp_path / "variants.yaml"
    variants.write_text("[{name: b-fft, feedback: binary, objective: fft, policies: [sft]}]\n")
    done = cli("loop", manifest, "--rounds", 1, "--variants", variants)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "sim"
    curve = pl.read_parquet(run / "learning_curve.parquet")  # also printed, with intervals
    # the seed policy plays control_games wherever it is deployed: in round 0 and as the control
    assert curve.select("policy", "round", "games").rows() == [("b-fft", 1, 4), ("control", 1, 6), ("sft", 0, 6)]
    assert curve["success_ci_low"].le(curve["success_rate"]).all()
    assert "decoded feedback against the simulator's truth" in done.stdout
    assert (run / "round-1" / "deployed.parquet").is_file() and (tmp_path / "seed-round1.yaml").is_file()
    turns = pl.read_parquet(run / "data" / "turns.parquet")
    assert set(turns["policy"]) == {"sft"}  # round 1 trained on round 0's deployment
    again = cli("loop", manifest, "--rounds", 1, "--variants", variants)  # everything done: nothing runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert " tasks submitted" not in again.stderr and again.stdout.splitlines()[-8:] == done.stdout.splitlines()[-8:]


def test_loop_builds_a_taught_policy_base_and_a_decoder_for_a_simulated_setting(tmp_path):
    if not (KILOGRAM / "dense.json").is_file():
        pytest.skip(f"KiloGram data not found at {KILOGRAM}: the simulator speaks its descriptions")
    from safetensors.torch import load_file

    from respect_hpc.domain.simulator import SpeakerSettings, description_pool, human_games
    from respect_hpc.domain.synthetic import load_image_bank
    from respect_hpc.model.replica import replica_like
    from respect_hpc.simulation.inputs import simulation_inputs

    inputs = tmp_path / "inputs"
    manifest = tmp_path / "sim.yaml"
    manifest.write_text(f"""experiment: sim
round: 0
workdir: {tmp_path / 'runs'}
data: {{seed_data: {inputs / 'd0.parquet'}, validation: {inputs / 'validation.parquet'},
        images: {KILOGRAM / 'tangram_pngs'}}}
model: {{path: {inputs / 'policy'}, dtype: fp32, image_size: 112}}
decoder: {{model: {{path: {inputs / 'decoder'}, dtype: fp32}}}}
seeds: [1]
simulation: {{kilogram: {KILOGRAM}, games: 8, tangrams: 10, order: fixed, credit: asked, teach_steps: 30}}
""")
    killed = inputs / ".policy.partial"  # what a run killed while teaching the policy base leaves
    killed.mkdir(parents=True)
    (killed / "config.json").write_text("{}")
    simulation_inputs(load_manifest(manifest, check_files=False))
    assert not killed.exists()  # built again from nothing, then renamed into place
    d0 = pl.read_parquet(inputs / "d0.parquet")
    assert d0.height > 0 and set(d0["end"]) == {"successful"}
    in_play = load_image_bank(KILOGRAM, dense="dense.json").names[:10]
    assert {n for c in d0["context"] for n in c} == set(in_play)  # only the ten in play
    assert all(list(c) == sorted(c) for c in d0["context"])  # in the fixed order
    spoken = description_pool(load_image_bank(KILOGRAM, dense="dense.json").descriptions, "seed", 10)
    games = {credit: {g["game_id"]: g["chat"] for g in human_games(8, spoken, SpeakerSettings(
        pool="seed", order="fixed", credit=credit), seed=1)} for credit in ("asked", "target")}
    assert games["asked"] != games["target"]  # in these games someone picks another target than asked
    kept = set(d0["game_id"])  # D_0 keeps the successful games
    assert dict(d0.select("game_id", "chat").rows()) == {k: v for k, v in games["asked"].items() if k in kept}
    config = json.loads((inputs / "policy" / "config.json").read_text())
    assert config["perceiver_config"]["resampler_n_latents"] == 4
    fresh = replica_like("idefics2-8b", tmp_path / "fresh", image_tokens=4)
    taught, untaught = load_file(inputs / "policy" / "model.safetensors"), load_file(fresh / "model.safetensors")
    moved = [k for k in taught if not taught[k].equal(untaught[k])]
    assert moved and not any("vision_model" in k for k in moved)  # taught, the vision model as built
    decoder = json.loads((inputs / "decoder" / "config.json").read_text())
    assert decoder["perceiver_config"]["resampler_n_latents"] == 64  # the decoder: a replica of its own
    before = {p: p.stat().st_mtime_ns for p in inputs.rglob("*") if p.is_file()}
    simulation_inputs(load_manifest(manifest))  # all there: nothing is built again
    assert before == {p: p.stat().st_mtime_ns for p in inputs.rglob("*") if p.is_file()}
