"""Experiment tracking through Accelerate's TensorBoard tracker: a task killed, then preempted, then resumed logs
to one run, each step once, in order, with the values metrics.parquet keeps; merge logs the decoded labels.

Real TensorBoard event files, read back with TensorBoard's own reader; a real (tiny) training task."""

import polars as pl
import pytest
from conftest import write_round

import jobs.merge
import jobs.train
from respect_hpc.config.loading import load_manifest
from respect_hpc.training.trainer import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(folder, tag: str) -> list[tuple[int, float]]:
    """Every event of ``tag`` in the run folder's event files, orphaned ones kept (a repeated step would show)."""
    events = EventAccumulator(str(folder), purge_orphaned_data=False)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_a_killed_then_preempted_task_logs_each_step_once_to_one_run(tmp_path):
    manifest = write_round(tmp_path, training="{epochs: 2, effective_batch: 4, micro_batch: 2, warmup_steps: 1}",
                           extra="tracking: {backend: tensorboard, project: tiny}\n")
    text = manifest.read_text().replace("  zero_stage: null\n", "  zero_stage: null\n  checkpoint_every: 2\n")
    manifest.write_text(text)
    m = load_manifest(manifest)
    jobs.train.set_distributed_env()
    prepared = jobs.train.prepare(m, "b-fft", 1)
    spec = prepared.spec
    run_folder = m.run_dir.tracking / "tensorboard" / "tiny" / spec.tracking.name

    class Killed(Exception):
        pass

    calls = []

    def killed_at_step_3() -> bool:  # a crash after the checkpoint of step 2: step 3 was never committed
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return False

    with pytest.raises(Killed):
        train(spec, prepared.examples, prepared.validation, should_stop=killed_at_step_3, progress=lambda _: None)
    assert [s for s, _ in scalars(run_folder, "train/loss")] == [1, 2]  # what the checkpoint of step 2 committed
    assert train(spec, prepared.examples, prepared.validation, should_stop=lambda: True,
                 progress=lambda _: None) == "stopped"  # preempted: resumed at step 2, stopped after step 3
    assert train(spec, prepared.examples, prepared.validation, progress=lambda _: None) == "finished"

    metrics = pl.read_parquet(spec.out.metrics)
    steps = metrics.filter(pl.col("loss").is_not_null())
    logged = scalars(run_folder, "train/loss")
    assert [s for s, _ in logged] == steps["step"].to_list() == list(range(1, steps.height + 1))  # once, in order
    assert [v for _, v in logged] == pytest.approx(steps["loss"].to_list(), rel=1e-6)  # float32 in the events
    validated = metrics.filter(pl.col("val_exact_match").is_not_null())
    assert [s for s, _ in scalars(run_folder, "validation/exact_match")] == validated["step"].to_list()
    for tag in ("train/learning_rate", "train/grad_norm", "train/actions_per_s", "train/tokens_per_s",
                "train/peak_memory_gib", "train/objective", "train/entropy"):
        assert len(scalars(run_folder, tag)) == steps.height, tag
    assert all(v > 0 for _, v in scalars(run_folder, "train/grad_norm"))
    assert [p.name for p in run_folder.parent.iterdir()] == [spec.tracking.name]  # one run
    assert spec.out.tracking.is_file()


def test_merge_logs_the_decoded_label_counts(tmp_path):
    manifest = write_round(tmp_path, extra="tracking: {backend: tensorboard}\n")
    m = load_manifest(manifest)
    feedback = pl.read_parquet(m.run_dir.round_feedback(1))
    jobs.merge.track(m, feedback)
    folder = m.run_dir.tracking / "tensorboard" / "t" / "t-decode"
    binary = feedback.filter(pl.col("kind") == "binary")
    positive = binary.filter(pl.col("label") == 1).height
    assert scalars(folder, "decode/binary/positive") == [(1, positive)]
    assert scalars(folder, "decode/binary/positive_rate") == [(1, pytest.approx(positive / binary.height))]
