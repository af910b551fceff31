"""A round whose policy is of another family than IDEFICS2: a SmolVLM replica (the Idefics3 family) or a
Qwen2.5-VL replica (the Qwen2-VL family) trained by every stage of a tiny round with submitit's local executor,
the feedback decoded by the IDEFICS2-8B replica taught the label words (a decoder of its own, as a manifest may
name one)."""

import json

import polars as pl
import pytest
from conftest import multimodal_replica, write_logged_round
from safetensors.torch import load_file

from respect_hpc.cluster.controller import Controller
from respect_hpc.config.loading import load_manifest

# the official placement's intent in each family: (modules LoRA must reach, modules it must not)
PLACED = {"smolvlm": ((".connector.", ".text_model."), ".vision_model."),
          "qwen2.5-vl": ((".visual.merger.", ".language_model."), ".visual.blocks.")}


@pytest.mark.slow
@pytest.mark.parametrize("like", sorted(PLACED))
def test_a_policy_of_another_family_goes_through_a_whole_round(tmp_path, taught_decoder, like):
    policy = multimodal_replica(like, tmp_path / like)
    manifest = write_logged_round(tmp_path, policy)
    text = manifest.read_text()
    manifest.write_text(text.replace("decoder: {shards: 2, batch_tokens: 2048}",
                                     f"decoder: {{shards: 1, batch_tokens: 2048, model: {{path: {taught_decoder[0]}, "
                                     "dtype: fp32}}").replace("seeds: [1, 2]", "seeds: [1]"))
    m = load_manifest(manifest)
    assert Controller(m).run() == {"ingest": 1, "decode": 1, "merge": 1, "train": 1, "select": 1, "metrics": 1}
    run = tmp_path / "runs" / "tiny" / "round-1"
    assert pl.read_parquet(run / "feedback.parquet").height > 0
    done = json.loads((run / "train" / "b-fft" / "seed-1" / "done.json").read_text())
    assert done["examples"] > 0 and 0 <= done["val_exact_match"] <= 1
    weights = load_file(run / "policies" / "b-fft" / "adapter_model.safetensors")  # the official placement:
    reached, spared = PLACED[like]  # the language model and the connector, never the vision model
    assert all(any(part in k for k in weights) for part in reached) and not any(spared in k for k in weights)
    assert (run / "metrics" / "round_metrics.parquet").is_file()


def test_the_smolvlm_manifest_plans_on_its_replica(tmp_path, taught_decoder):
    """manifests/smolvlm-b-fft-round1.yaml as a dry run takes it: the cluster's paths replaced by overrides
    (a SmolVLM replica, synthetic logs), planned without Slurm: three seeds of B-FFT on the SmolVLM family."""
    from conftest import REPO, cli, round_inputs

    inputs = round_inputs(tmp_path, games=6, model=multimodal_replica("smolvlm", tmp_path / "smolvlm"))
    done = cli("plan", REPO / "manifests" / "smolvlm-b-fft-round1.yaml", f"workdir={tmp_path / 'runs'}",
               f"data.interactions=[{inputs['logs']}]", f"data.seed_data={inputs['d0']}",
               f"data.validation={inputs['validation']}", f"data.images={inputs['images']}",
               f"model.path={inputs['model']}", f"decoder.model.path={taught_decoder[0]}")
    assert done.returncode == 0, done.stderr
    shown = " ".join(done.stdout.split())
    assert "b-fft" in shown and "#SBATCH --gpus-per-node=2" in done.stdout, done.stdout


def test_the_qwen_manifest_plans_on_its_replica(tmp_path, taught_decoder):
    """manifests/qwen2.5-vl-b-fft-round1.yaml as a dry run takes it, on a Qwen2.5-VL replica."""
    from conftest import REPO, cli, round_inputs

    inputs = round_inputs(tmp_path, games=6, model=multimodal_replica("qwen2.5-vl", tmp_path / "qwen"))
    overrides = [f"workdir={tmp_path / 'runs'}", f"data.interactions=[{inputs['logs']}]",
                 f"data.seed_data={inputs['d0']}", f"data.validation={inputs['validation']}",
                 f"data.images={inputs['images']}", f"model.path={inputs['model']}",
                 f"decoder.model.path={taught_decoder[0]}"]
    done = cli("plan", REPO / "manifests" / "qwen2.5-vl-b-fft-round1.yaml", *overrides)
    assert done.returncode == 0, done.stderr
    assert "b-fft" in done.stdout and "#SBATCH --gpus-per-node=2" in done.stdout, done.stdout
    splitting = cli("validate", REPO / "manifests" / "qwen2.5-vl-b-fft-round1.yaml", *overrides,
                    "model.image_splitting=true")
    assert splitting.returncode == 2, splitting
    assert "model.image_splitting: the qwen2_vl family does not split images (expected false)" in splitting.stdout
