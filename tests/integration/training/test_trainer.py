"""Training: LoRA placement, the loop on a tiny Idefics2 with real tangram images, checkpoints, resume.

Every test trains a real (tiny, random-weight) transformers model with PEFT and
Accelerate; the DeepSpeed and preemption tests run real subprocesses through
submitit's local executor and send real signals.
"""

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import polars as pl
import pytest
import submitit
import torch
from conftest import cli, write_round
from safetensors.torch import load_file

import jobs.ingest
import jobs.train
from respect_hpc.cluster.executors import executor
from respect_hpc.config.loading import load_manifest
from respect_hpc.config.schema import ModelSection
from respect_hpc.core.rundir import TaskDir
from respect_hpc.data.batching import epoch_batches, sequences
from respect_hpc.data.datasets import DatasetError
from respect_hpc.data.logs import IngestError
from respect_hpc.model.loading import load_policy
from respect_hpc.training.spec import TrainingError, TrainSpec, accumulation_steps
from respect_hpc.training.trainer import Trainer

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from respect_hpc.model.replica import replica_like

    return replica_like("idefics2-8b", tmp_path_factory.mktemp("policy") / "model")


def lora_modules(model) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A" in name}


def test_lora_placements(model):
    spec = ModelSection(path=model, dtype="fp32")
    official = lora_modules(load_policy(spec, r=8, alpha=8, dropout=0.1))
    paper = lora_modules(load_policy(spec, r=8, alpha=8, dropout=0.1, placement="paper"))
    enhanced = lora_modules(load_policy(spec, r=8, alpha=8, dropout=0.1, placement="enhanced"))
    assert {n.rsplit(".", 1)[1] for n in official - paper} == {"o_proj"}  # multitask.gin's regex adds o_proj
    assert paper < official and any("text_model" in n for n in official - paper)
    assert any("perceiver_resampler" in n for n in official - paper)
    assert not any("vision_model" in n for n in paper)
    for part in ("text_model", "connector.modality_projection", "connector.perceiver_resampler"):
        assert any(part in n for n in paper), part
    assert {n.rsplit(".", 1)[1] for n in paper} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    vision = {n.rsplit(".", 1)[1] for n in enhanced - paper}
    assert vision == {"out_proj", "fc1", "fc2"} and all("vision_model" in n for n in enhanced - paper)


@pytest.mark.parametrize("r", [8, 16])
def test_lora_a_starts_gaussian_with_std_one_over_r_as_the_official_runs(model, r, tmp_path):
    """init_lora_weights="gaussian": A ~ N(0, 1/r); PEFT's default (Kaiming-uniform with a = sqrt(5)) gives
    U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in); B starts at zero either way. The sample std of n values
    drawn with std s is within 5 s sqrt(2/n) of s with overwhelming probability."""
    spec = ModelSection(path=model, dtype="fp32")
    policy = load_policy(spec, r=r, alpha=r, dropout=0.1, seed=1)
    a = torch.cat([p.detach().flatten() for n, p in policy.named_parameters() if "lora_A" in n])
    assert abs(a.std().item() - 1 / r) < 5 / r * (2 / a.numel()) ** 0.5
    assert all(not p.any() for n, p in policy.named_parameters() if "lora_B" in n)
    default = load_policy(spec, r=r, alpha=r, dropout=0.1, init="default", seed=1)
    weights = dict(default.named_parameters())
    for name, p in weights.items():
        if "lora_A" in name:
            assert p.abs().max().item() <= 1 / p.shape[1] ** 0.5
    policy.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "gaussian" and "o_proj" in saved["target_modules"]


def steps_per_epoch(examples: pl.DataFrame, micro_batch: int, effective_batch: int, world: int = 1) -> int:
    """Optimizer steps an epoch: sequences (batching.py, tested in test_batching.py) of D_0 and the logged turns
    fill micro-batches of their own (one task each), as many a step as make about effective_batch actions."""
    rows = sequences(examples, packing="game")
    tasks = [examples["source"][r[0]] == "log" for r in rows]
    per_step = world * accumulation_steps(effective_batch, micro_batch, world, answers=examples.height / len(rows))
    return len(epoch_batches([0] * len(rows), micro_batch, per_step, 1, 0, tasks=tasks)) // per_step


def _spec(manifest, variant, out, packing="game", gradient_checkpointing=False, **changes):
    m = load_manifest(manifest)
    v = jobs.train.variant_of(m, variant)
    prepared = jobs.train.prepare(m, variant, 1)
    hp = m.objective(v).model_copy(update=changes)
    training = m.training.model_copy(update={"zero_stage": None, "packing": packing, "vision_cache": False,
                                             "gradient_checkpointing": gradient_checkpointing})
    spec = TrainSpec(objective=v.objective, hp=hp, seed=1, model=m.model, policy_template=m.policy_template,
                     images=m.data.images, out=TaskDir(out), training=training, collecting=prepared.spec.collecting)
    return spec, prepared


@pytest.fixture(scope="module")
def round_files(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("round")
    variants = ("[{name: b-fft, feedback: binary, objective: fft}, {name: t-rl, feedback: ternary, objective: rl},"
                " {name: b-kto, feedback: binary, objective: kto, init: base}]")
    return write_round(root, variants=variants, model=model)


@pytest.mark.parametrize("variant", ["b-fft", "t-rl", "b-kto"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(round_files, variant, tmp_path):
    jobs.train.set_distributed_env()
    # RMSProp (KTO's optimizer) takes steps of about lr / sqrt(1 - alpha) at first: a smaller rate. A random
    # replica gives a 3-token action a probability near e^-31, far below the logged p: with the paper's beta (0.5)
    # KTO's sigmoid is saturated and its gradient vanishes; a small beta keeps it in range.
    spec, prepared = _spec(round_files, variant, tmp_path, packing="turn",
                           learning_rate=1e-3 if variant == "b-kto" else 3e-3,
                           warmup_steps=0, micro_batch=8, beta=0.01,
                           effective_batch=8, lora_dropout=0.0, entropy_weight=0.0)
    with Trainer(spec, prepared.examples, prepared.validation) as trainer:
        if variant == "b-kto":  # the starting policy scored each logged example's mismatched click once
            reference = pl.read_parquet(spec.out.mismatch_reference)
            assert reference.height == prepared.examples.filter(pl.col("source") == "log").height
            assert (reference["logprob"] < 0).all()
        labels = prepared.examples["label"].to_list()
        # KTO's reference point is the batch's mean log-ratio: a batch of one label alone gives it nothing to
        # separate, so the batch mixes desirable and undesirable actions where the objective keeps both.
        mixed = [i for i, x in enumerate(labels) if x == 1][:4] + [i for i, x in enumerate(labels) if x == -1][:4]
        indices = mixed if len(mixed) == 8 else list(range(8))
        batch = trainer.data.batch(indices, epoch=None)  # whole sequences (no per-epoch draw of negatives)
        losses = []
        for _ in range(6):
            z = trainer.losses.reference_point([indices], None) if variant == "b-kto" else None
            parts = trainer.losses.loss(batch, z)
            losses.append(parts.total.item())
            trainer.accelerator.backward(parts.total)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
    # KTO's loss moves by about lambda * beta / 4 per nat of log-probability: at beta 0.01, by little
    assert losses[-1] < losses[0] - (1e-4 if variant == "b-kto" else 1e-3), losses


def test_task_trains_validates_and_saves_reloadable_adapters(round_files):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    m = load_manifest(round_files)
    result = jobs.train.run(m, "b-fft", 1)
    out = jobs.train.task_dir(m, "b-fft", 1)
    metrics = pl.read_parquet(out.metrics)
    steps = metrics.filter(pl.col("loss").is_not_null())
    epochs = metrics.filter(pl.col("val_exact_match").is_not_null())
    prepared = jobs.train.prepare(m, "b-fft", 1)
    per_epoch = steps_per_epoch(prepared.examples, 4, 8)
    assert steps["step"].to_list() == list(range(1, 2 * per_epoch + 1))
    assert epochs["epoch"].to_list() == [1, 2] and epochs["step"].to_list() == [per_epoch, 2 * per_epoch]
    assert epochs["val_exact_match"].is_between(0, 1).all() and (epochs["val_loss"] > 0).all()
    assert steps["learning_rate"].max() == pytest.approx(1e-4) and steps["learning_rate"][-1] == 0
    assert result["best_epoch"] in (1, 2) and json.loads(out.done.read_text())["spec_hash"]
    sources = pl.read_parquet(out.sources)  # where the examples came from, for reports
    assert set(sources["source"]) == {"log", "d0", "augmented"} and sources["examples"].sum() == result["examples"]
    assert sorted(p.name for p in out.epochs.iterdir()) == ["epoch-001", "epoch-002"]
    assert len(list(out.checkpoints.glob("step-*"))) == 1  # older optimizer states are pruned
    base = AutoModelForImageTextToText.from_pretrained(m.model.path)
    reloaded = PeftModel.from_pretrained(base, out.epoch(2))
    saved = load_file(out.epoch(2) / ADAPTER)
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # trained: B starts at zero
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())
    # a rerun with the same inputs does nothing
    before = (out.metrics).stat().st_mtime_ns
    assert jobs.train.run(m, "b-fft", 1) == result
    assert (out.metrics).stat().st_mtime_ns == before


def _with(manifest: Path, old: str, new: str) -> Path:
    text = manifest.read_text()
    assert old in text
    changed = manifest.with_name(f"changed-{abs(hash(new))}.yaml")
    changed.write_text(text.replace(old, new))
    return changed


def test_bad_input_is_refused_before_training(round_files, tmp_path):
    from respect_hpc.config.loading import ManifestError

    with pytest.raises(ManifestError, match=r"training.fft: effective_batch 10 is not a multiple of micro_batch 4"):
        load_manifest(_with(round_files, "fft: {epochs: 2, effective_batch: 8", "fft: {epochs: 2, effective_batch: 10"))
    with pytest.raises(TrainingError, match=r"training.fft.effective_batch 8 is not a multiple of micro_batch 4 x 3 "
                                            r"processes"):  # the world size is known only when the task starts
        accumulation_steps(8, 4, 3, "training.fft")
    previous = _with(round_files, "init: base", "init: previous")
    seed_policy = load_manifest(round_files).run_dir.policy(0, "sft")  # also KTO's collecting policy of sft
    seed_policy.rename(tmp_path / "sft")
    try:
        with pytest.raises(ManifestError, match=r"variants\[\d\].init: continues from round 0's selected policy, "
                                                r"but '.*round-0/policies/sft' holds no adapter: run that round"):
            load_manifest(previous)  # known before any job is submitted
        m = load_manifest(previous, check_files=False)
        with pytest.raises(TrainingError, match=r"variant b-kto: continues from the previous round's adapter, but "
                                                r"'.*round-0/policies/sft' holds none"):
            jobs.train.prepare(m, "b-kto", 1)
    finally:
        (tmp_path / "sft").rename(seed_policy)
    with pytest.raises(TrainingError, match="--variant b-xx: the manifest has no such variant"):
        jobs.train.prepare(m, "b-xx", 1)
    validation = pl.read_parquet(load_manifest(round_files).data.validation)
    bad = validation.with_columns(context=pl.col("context").list.eval(pl.element().str.replace(r"^", "nope-")),
                                  targets=pl.col("targets").list.eval(pl.element().str.replace(r"^", "nope-")),
                                  clicks=pl.col("clicks").list.eval(pl.element().list.eval(
                                      pl.element().str.replace(r"^", "nope-"))))
    bad.write_parquet(tmp_path / "validation.parquet")
    m = load_manifest(_with(round_files, str(load_manifest(round_files).data.validation),
                            str(tmp_path / "validation.parquet")))
    with pytest.raises(TrainingError, match=r"data.validation: \d+ images are not in data.images '.*', e.g. nope-"):
        jobs.train.prepare(m, "b-fft", 1)
    path = m.run_dir.round_feedback(1)
    feedback = pl.read_parquet(path)
    try:
        feedback.with_columns(label=pl.lit(-1, pl.Int8)).write_parquet(path)
        with pytest.raises(DatasetError, match="variant b-fft: no positive binary feedback"):
            jobs.train.prepare(m, "b-fft", 1)
        done = cli("train", round_files, "--variant", "b-fft", "--seed", "1")
        assert done.returncode == 2
        assert done.stderr.strip().splitlines()[-1] == "error: variant b-fft: no positive binary feedback in the " \
                                                       "logs: nothing to train on"
    finally:
        feedback.write_parquet(path)


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint(round_files):
    manifest = _with(_with(round_files, "  zero_stage: null", "  zero_stage: null\n  checkpoint_every: 1"),
                     "fft: {epochs: 2, effective_batch: 8, micro_batch: 4, warmup_steps: 1}",
                     "fft: {epochs: 2, effective_batch: 8, micro_batch: 4, warmup_steps: 0, learning_rate: 1.0e+30}")
    m = load_manifest(_copy_round(manifest, "nan"))
    assert m.training.fft.learning_rate == 1e30
    with pytest.raises(TrainingError, match=r"step \d+ \(epoch 0\): the loss is not finite; stopped; the last good "
                                            r"checkpoint is .*ckpt/step-\d{6}"):
        jobs.train.run(m, "b-fft", 1)
    assert not jobs.train.task_dir(m, "b-fft", 1).done.exists()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _copy_round(manifest: Path, experiment: str) -> Path:
    changed = _with(manifest, "experiment: t", f"experiment: {experiment}")
    source = load_manifest(manifest).run_dir.root
    target = load_manifest(changed).run_dir.root
    shutil.copytree(source / "data", target / "data")
    shutil.copytree(source / "round-1", target / "round-1", ignore=shutil.ignore_patterns("train"))
    return changed


@pytest.mark.slow
def test_a_task_preempted_by_a_real_signal_requeues_and_ends_as_if_uninterrupted(round_files):
    three_epochs = "fft: {epochs: 3, effective_batch: 8, micro_batch: 4, warmup_steps: 1}"
    manifest = _with(round_files, "fft: {epochs: 2, effective_batch: 8, micro_batch: 4, warmup_steps: 1}",
                     three_epochs)
    interrupted = load_manifest(_copy_round(manifest, "preempted"))
    straight = load_manifest(_copy_round(manifest, "straight"))
    job = executor(interrupted, "train", "local").submit(jobs.train.TrainTask(interrupted, "b-fft", 2))
    deadline = time.time() + 300
    while "step 10/" not in (job.stderr() or ""):
        assert time.time() < deadline and not job.done(), job.stderr()
        time.sleep(0.2)
    tasks = _children(job._process.pid)
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)  # what Slurm sends before preemption or the time limit
    result = job.result()
    log = job.stderr()
    assert "stopped at step" in log and "resumed at step" in log, log
    jobs.train.run(straight, "b-fft", 2)
    out_a, out_b = (jobs.train.task_dir(m, "b-fft", 2) for m in (interrupted, straight))
    for epoch in (1, 2, 3):
        a, b = load_file(out_a.epoch(epoch) / ADAPTER), load_file(out_b.epoch(epoch) / ADAPTER)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    steps = pl.read_parquet(out_a.metrics)
    assert steps["step"].to_list() == pl.read_parquet(out_b.metrics)["step"].to_list()
    assert result["val_exact_match"] == pytest.approx(
        json.loads(out_b.done.read_text())["val_exact_match"])


@pytest.mark.slow
def test_deepspeed_zero2_with_two_cpu_processes_saves_an_adapter_that_reloads(round_files):
    """With gradient checkpointing on, as a memory-bound GPU run would have it."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    manifest = _with(_copy_round(round_files, "zero2"), "  zero_stage: null",
                     "  zero_stage: 2\n  gradient_checkpointing: true\n"
                     "cluster:\n  executor: local\n  stages:\n    train: {tasks_per_node: 2}")
    m = load_manifest(manifest)
    assert m.cluster.stages["train"].processes == 2 and m.training.gradient_checkpointing
    job = executor(m, "train", "local").submit(jobs.train.TrainTask(m, "b-fft", 1))
    try:
        results = job.results()
    except submitit.core.utils.FailedJobError:
        pytest.fail(job.task(0).stderr())
    assert len(results) == 2 and results[0]["best_epoch"] in (1, 2)
    out = jobs.train.task_dir(m, "b-fft", 1)
    log = job.task(0).stderr()
    assert "DeepSpeed ZeRO-2, 2 process(es) on cpu (sdpa attention), 1 micro-batch(es) of 4 sequences accumulated per step" in log
    state = next(out.checkpoints.glob("step-*")) / "state"
    assert (state / "latest").is_file()  # a DeepSpeed engine checkpoint, frozen base weights excluded
    assert sum(f.stat().st_size for f in state.rglob("*") if f.is_file()) < 5_000_000
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(m.model.path),
                                         out.epoch(2))
    trained = {n: p for n, p in reloaded.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().sum() > 0 for p in trained.values())
    metrics = pl.read_parquet(out.metrics)
    examples = jobs.train.prepare(m, "b-fft", 1).examples
    assert metrics.filter(pl.col("loss").is_not_null()).height == 2 * steps_per_epoch(examples, 4, 8, world=2)


def test_a_text_only_causal_lm_policy_trains(tmp_path):
    """IDEFICS2-8B's language model alone (Mistral architecture, same tokenizer and template) as the policy."""
    from respect_hpc.model.replica import replica_like

    manifest = write_round(tmp_path, model=replica_like("idefics2-8b-text", tmp_path / "text"), games=12,
                           training="{epochs: 1, effective_batch: 8, micro_batch: 4, warmup_steps: 1}")
    m = load_manifest(manifest)
    result = jobs.train.run(m, "b-fft", 1)
    out = jobs.train.task_dir(m, "b-fft", 1)
    assert result["best_epoch"] == 1 and (out.epoch(1) / ADAPTER).is_file()
    assert pl.read_parquet(out.metrics)["val_exact_match"].drop_nulls().len() == 1


def test_training_with_image_splitting_when_the_manifest_asks_for_it(tmp_path, model):
    """Five crops an image (IDEFICS2's do_image_splitting): 320 image tokens an image, every crop's pixels."""
    manifest = write_round(tmp_path, model=model, games=6, model_options=", image_splitting: true",
                           training="{epochs: 1, effective_batch: 4, micro_batch: 2, warmup_steps: 0}")
    m = load_manifest(manifest)
    assert m.model.image_splitting is True
    result = jobs.train.run(m, "b-fft", 1)
    out = jobs.train.task_dir(m, "b-fft", 1)
    assert result["best_epoch"] == 1 and (out.epoch(1) / ADAPTER).is_file()
    steps = pl.read_parquet(out.metrics).filter(pl.col("loss").is_not_null())
    assert steps.height >= 1 and steps["loss"].is_finite().all()


def test_a_changed_hyperparameter_never_resumes_the_old_checkpoint(tmp_path, model, capsys):
    training = "{epochs: 1, effective_batch: 4, micro_batch: 4, warmup_steps: 0, learning_rate: %s}"
    manifest = write_round(tmp_path, model=model, games=6, training=training % "1.0e-4")
    first = load_manifest(manifest)
    jobs.train.run(first, "b-fft", 1)
    out = jobs.train.task_dir(first, "b-fft", 1)
    before = (out.epoch(1) / ADAPTER).read_bytes()
    manifest.write_text(manifest.read_text().replace("learning_rate: 1.0e-4", "learning_rate: 3.0e-3"))
    changed = load_manifest(manifest)
    assert jobs.train.task_dir(changed, "b-fft", 1) == out
    capsys.readouterr()
    result = jobs.train.run(changed, "b-fft", 1)
    assert "was written by another spec" in capsys.readouterr().out
    assert "resumed" not in capsys.readouterr().out
    assert (out.epoch(1) / ADAPTER).read_bytes() != before
    steps = pl.read_parquet(out.metrics).filter(pl.col("loss").is_not_null())
    assert steps["learning_rate"].max() > 1e-3  # trained at the new rate, from the start
    assert result["spec_hash"] == json.loads(out.done.read_text())["spec_hash"]


def test_a_damaged_checkpoint_is_never_resumed(tmp_path, model, capsys):
    """Each file of an unfinished task's checkpoint truncated in turn: the task starts afresh (never a crash, never a
    silent partial resume) and ends with the adapter an undisturbed run writes."""
    manifest = write_round(tmp_path, model=model, games=6,
                           training="{epochs: 1, effective_batch: 4, micro_batch: 4, warmup_steps: 0}")
    m = load_manifest(manifest)
    jobs.train.run(m, "b-fft", 1)
    out = jobs.train.task_dir(m, "b-fft", 1)
    undisturbed = (out.epoch(1) / ADAPTER).read_bytes()
    checkpoint = next(out.checkpoints.glob("step-*"))
    names = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert {"trainer.json", "adapter/adapter_model.safetensors", "state/optimizer.bin",
            "state/random_states_0.pkl"} <= set(names), names
    for name in names:
        checkpoint = next(out.checkpoints.glob("step-*"))
        out.done.unlink()  # the task is unfinished: its last checkpoint is what a rerun resumes
        with (checkpoint / name).open("r+b") as handle:
            handle.truncate((checkpoint / name).stat().st_size // 2)
        capsys.readouterr()
        jobs.train.run(m, "b-fft", 1)
        printed = capsys.readouterr().out
        assert f"'{checkpoint / name}' is " in printed and "training starts afresh" in printed, (name, printed)
        assert "resumed" not in printed
        assert (out.epoch(1) / ADAPTER).read_bytes() == undisturbed, name


def test_dataset_writes_the_exact_examples_of_a_task(round_files, tmp_path):
    """`respect-hpc dataset`: one row per example the task trains on, with where it comes from."""
    out = tmp_path / "t-rl.parquet"
    done = cli("dataset", round_files, "--variant", "t-rl", "--seed", "1", "--out", out)
    assert done.returncode == 0, done.stderr
    table = pl.read_parquet(out)
    assert table.columns == ["source", "policy", "round", "game_turn_id", "label", "reward", "weight", "action",
                             "prob_action"]
    prepared = jobs.train.prepare(load_manifest(round_files), "t-rl", 1)
    assert table["game_turn_id"].to_list() == prepared.examples["game_turn_id"].to_list()
    assert set(table["source"]) == {"log", "d0", "augmented"}
    logged = table.filter(pl.col("source") == "log")
    assert 0 not in set(logged["label"]) and logged["prob_action"].is_not_null().all()
    assert "examples" in done.stdout and "log" in done.stdout
    for action in table["action"]:
        assert action.startswith(("select ", "deselect ")), action


def test_a_task_whose_lora_does_not_move_stops_after_its_first_step(round_files, tmp_path):
    """LoRA B matrices frozen on purpose: the first step with a learning rate above zero leaves them at zero, and
    the task stops with one line instead of training nothing for 20 epochs."""
    jobs.train.set_distributed_env()
    spec, prepared = _spec(round_files, "b-fft", tmp_path, warmup_steps=2, micro_batch=4, effective_batch=8)
    with Trainer(spec, prepared.examples, prepared.validation) as trainer:
        frozen = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
        for p in frozen:
            p.requires_grad_(False)
        with pytest.raises(TrainingError, match=rf"step 2: no LoRA B matrix moved \({len(frozen)} checked\) although "
                                                r"the learning rate is above zero"):  # step 1 runs at lr 0
            trainer.run(progress=lambda _: None)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(round_files, tmp_path):
    jobs.train.set_distributed_env()
    results = []
    for checkpointing in (False, True):
        spec, prepared = _spec(round_files, "t-rl", tmp_path / str(checkpointing), micro_batch=4, effective_batch=4,
                               lora_dropout=0.0, gradient_checkpointing=checkpointing)
        with Trainer(spec, prepared.examples, prepared.validation) as trainer:
            base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
            assert base.is_activation_checkpointing == checkpointing
            for p in trainer.model.parameters():  # B starts at zero: give it values so every gradient flows
                if p.requires_grad:
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(p.numel()))
            parts = trainer.losses.loss(trainer.data.batch([0, 1, 2, 3], epoch=0))
            trainer.accelerator.backward(parts.total)
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
            results.append((parts.total.item(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and all(torch.allclose(grads[n], grads_ckpt[n], atol=1e-6)
                                                     for n in grads)


def test_a_kto_task_runs_whole_with_its_reference_point(round_files):
    m = load_manifest(_with(round_files, "kto: {epochs: 2", "kto: {epochs: 1"))
    result = jobs.train.run(m, "b-kto", 1)
    out = jobs.train.task_dir(m, "b-kto", 1)
    steps = pl.read_parquet(out.metrics).filter(pl.col("loss").is_not_null())
    assert result["best_epoch"] == 1 and steps.height >= 1 and steps["loss"].is_finite().all()
    reference = pl.read_parquet(out.mismatch_reference)
    logged = jobs.train.prepare(m, "b-kto", 1).examples.filter(pl.col("source") == "log")
    assert sorted(reference["game_turn_id"]) == sorted(logged["game_turn_id"])


def test_dataset_shows_each_variants_lineage_on_logs_of_several_policies(tmp_path, model):
    """The issue's audit: each variant's own policies, D_0 good turns with both augmentations, KTO's lambda
    weights, no neutral RL rows."""
    variants = ("[{name: b-fft, feedback: binary, objective: fft, policies: [sft, bp]},"
                " {name: t-rl, feedback: ternary, objective: rl, policies: [sft, ta]},"
                " {name: b-kto, feedback: binary, objective: kto, init: base, policies: [sft, bk]}]")
    manifest = write_round(tmp_path, variants=variants, model=model, games=12,
                           policies={"sft": 0.5, "bp": 0.6, "ta": 0.6, "bk": 0.6})
    tables = {}
    for variant in ("b-fft", "t-rl", "b-kto"):
        out = tmp_path / f"{variant}.parquet"
        done = cli("dataset", manifest, "--variant", variant, "--seed", "1", "--out", out)
        assert done.returncode == 0, done.stderr
        tables[variant] = pl.read_parquet(out)
    own = {"b-fft": "bp", "t-rl": "ta", "b-kto": "bk"}
    for variant, table in tables.items():
        logged = table.filter(pl.col("source") == "log")
        assert set(logged["policy"]) == {"sft", own[variant]}, variant
        d0 = table.filter(pl.col("source") != "log")
        assert set(d0["policy"]) == {"human"} and set(d0["label"]) == {1}
    augmented = tables["b-fft"].filter(pl.col("source") == "augmented")["game_turn_id"]
    assert augmented.str.ends_with("_aug_remove_last").any() and augmented.str.ends_with("_aug_remove_current").any()
    assert 0 not in set(tables["t-rl"]["label"])
    other_seed = tmp_path / "b-fft-seed-2.parquet"
    done = cli("dataset", manifest, "--variant", "b-fft", "--seed", "2", "--out", other_seed)
    assert done.returncode == 0, done.stderr
    rehearsal = pl.col("source") != "log"  # training.d0_augmentation_seed, not the task's seed, draws D_0
    assert pl.read_parquet(other_seed).filter(rehearsal).equals(tables["b-fft"].filter(rehearsal))
    done = cli("dataset", manifest, "--variant", "t-rl", "--seed", "1", "--out", tmp_path / "again.parquet")
    negatives = tables["t-rl"].filter((pl.col("source") == "log") & (pl.col("label") == -1)).height
    assert re.search(rf"negatives: \d+ of the {negatives} are trained each epoch, drawn afresh", done.stdout)
    kto = tables["b-kto"].filter(pl.col("source") == "log")
    assert dict(kto.select("label", "weight").unique().iter_rows()) == {1: 4.0, -1: 1.0}


def test_kto_measures_z_against_each_examples_collecting_policy_with_dropout_on(tmp_path, model):
    """The reference of a logged example's mismatched click is its score under the adapter that logged it
    (each policy its own), the click scored by hand on a fresh base model with that adapter; the current
    policy's side of z is measured in training mode; a missing collecting adapter is refused by name."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from respect_hpc.domain.multiref import letters_of, mismatched_click
    from respect_hpc.model.policy_inputs import policy_view
    from respect_hpc.training.objectives import score_actions

    variants = "[{name: b-kto, feedback: binary, objective: kto, init: base}]"
    manifest = write_round(tmp_path, variants=variants, model=model, games=6, policies={"sft": 0.5, "bk": 0.6})
    spec, prepared = _spec(manifest, "b-kto", tmp_path / "task", lora_dropout=0.5)
    assert set(spec.collecting) == {("bk", 0), ("sft", 0)}
    jobs.train.set_distributed_env()
    with Trainer(spec, prepared.examples, prepared.validation) as trainer:
        reference = trainer.losses.mismatch_reference
        logged = [r for r in trainer.data.examples if r["source"] == "log"]
        assert set(reference) == {r["game_turn_id"] for r in logged}
        dropout = next(m for n, m in trainer.model.named_modules() if n.endswith("lora_dropout.default"))
        modes = []
        dropout.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        trainer.model.eval()
        trainer.losses.mismatch_logprobs(logged[:2])
        assert modes and all(modes)  # dropout on while z is measured, whatever mode the model was in
        encoder, template = trainer.data.encoder, trainer.data.template
    base = AutoModelForImageTextToText.from_pretrained(model)
    scored = {}
    for policy in ("sft", "bk"):
        row = next(r for r in logged if r["policy"] == policy)
        click = {**row, "action": mismatched_click(row["action"], letters_of(row["currently_selected"],
                                                                             row["context"]))}
        batch = encoder.collate([encoder.encode(policy_view(click, template))])
        peft = PeftModel.from_pretrained(base, spec.collecting[(policy, 0)]).eval()
        with torch.no_grad():
            logits = peft(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                   "pixel_attention_mask")}).logits
        n = int(batch["target_mask"].sum())
        want = score_actions(logits[:, -n - 1:-1], batch["targets"], batch["target_mask"]).logprob.item()
        base = peft.unload()
        scored[policy] = want
        # float32 sums of about 100 token log-probabilities, batched alone vs with others (left padding)
        assert reference[row["game_turn_id"]] == pytest.approx(want, rel=1e-4, abs=1e-4), policy
    assert scored["sft"] != pytest.approx(scored["bk"], abs=1e-3)  # the two policies differ

    shutil.rmtree(load_manifest(manifest).run_dir.policy(0, "bk"))
    missing = (r"variant b-kto: KTO's reference point scores each logged example under the policy that logged it; "
               r"policy bk of round 0 has no adapter")
    with pytest.raises(IngestError, match=missing):
        jobs.train.prepare(load_manifest(manifest), "b-kto", 1)
    with pytest.raises(IngestError, match=missing):  # the round's first stage already refuses, before decoding
        jobs.ingest.run(load_manifest(manifest))


def test_micro_batches_built_ahead_train_the_same_adapter(round_files, tmp_path):
    """training.prefetch builds each micro-batch in a worker thread while the one before it runs: the same
    batches, so the same losses and, bit for bit, the same adapter as building them in the loop."""
    jobs.train.set_distributed_env()
    prepared = jobs.train.prepare(load_manifest(round_files), "t-rl", 1)
    outcomes = {}
    for prefetch in (True, False):
        spec = TrainSpec(**{**prepared.spec.__dict__, "out": TaskDir(tmp_path / f"prefetch-{prefetch}"),
                            "training": prepared.spec.training.model_copy(update={"prefetch": prefetch}),
                            "hp": prepared.spec.hp.model_copy(update={"epochs": 1, "effective_batch": 16,
                                                                       "micro_batch": 1}), "tracking": None})
        with Trainer(spec, prepared.examples, prepared.validation) as trainer:
            per_step = trainer.per_step
            assert per_step > 1  # several micro-batches a step: each but the first built ahead
            losses = [trainer.step(list(trainer.data.epoch(0, per_step)[i * per_step:(i + 1) * per_step]), 0, i).loss
                      for i in range(3)]
            weights = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model)
                       .named_parameters() if "lora_" in n}
            assert trainer.waited > 0  # the first micro-batch of each step is always awaited
        outcomes[prefetch] = (losses, weights)
    assert outcomes[True][0] == outcomes[False][0]
    assert all(torch.equal(outcomes[True][1][n], outcomes[False][1][n]) for n in outcomes[False][1])
