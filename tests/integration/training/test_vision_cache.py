"""The frozen vision model's outputs, cached: the same logits as without, each crop computed once per round
(memory, then disk, shared by tasks), a damaged file computed again, never where the vision model trains."""

import dataclasses

import pytest
import torch
from conftest import MULTIMODAL, multimodal_replica, write_round

import jobs.train
from respect_hpc.config.loading import load_manifest
from respect_hpc.core.rundir import TaskDir
from respect_hpc.model.families import interface_family
from respect_hpc.model.loading import load_policy
from respect_hpc.model.policy_inputs import answer_logits
from respect_hpc.model.vision_cache import CachedVision, cache_vision
from respect_hpc.training.trainer import Trainer

# the interfaces whose family has a vision tower apart from its connector (Qwen2-VL's merger sits inside its tower)
FROZEN_TOWER = [like for like in MULTIMODAL if interface_family(like).vision_tower is not None]


@pytest.fixture(scope="module", params=FROZEN_TOWER)
def round_files(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("vision")
    return write_round(root, model=multimodal_replica(request.param, root / "model"))


def trainer_for(round_files, out, vision_cache, **hp):
    m = load_manifest(round_files)
    prepared = jobs.train.prepare(m, "b-fft", 1)
    assert prepared.spec.vision_cache is not None  # on by default for the paper's placement
    spec = dataclasses.replace(prepared.spec, out=TaskDir(out), vision_cache=vision_cache,
                               hp=prepared.spec.hp.model_copy(update={"lora_dropout": 0.0, **hp}))
    jobs.train.set_distributed_env()
    return Trainer(spec, prepared.examples, prepared.validation)


def logits_of(trainer, sequences):
    with torch.no_grad():
        return answer_logits(trainer.model, trainer.data.batch(sequences, epoch=0))


def test_cached_features_give_the_same_logits_and_each_crop_is_computed_once(round_files, tmp_path):
    folder = tmp_path / "cache"
    with trainer_for(round_files, tmp_path / "plain", None) as plain:
        assert plain.vision_cache is None
        expected = [logits_of(plain, [s]) for s in range(3)]
    with trainer_for(round_files, tmp_path / "cached", folder) as trainer:
        cache = trainer.vision_cache
        assert isinstance(cache, CachedVision)
        first = [logits_of(trainer, [s]) for s in range(3)]
        images = {name for s in range(3) for i in trainer.data.sequences[s] for name in trainer.data.examples[i]["context"]}
        assert cache.computed == len(images)  # one crop an image at 224 px; repeats across sequences reused
        written = sorted(folder.glob("*.safetensors"))
        assert len(written) == len(images) and not list(folder.glob(".*tmp"))
        again = [logits_of(trainer, [s]) for s in range(3)]
        assert cache.computed == len(images) and cache.hashed == 0  # the batches brought their crops' digests
        for a, b, c in zip(expected, first, again):
            assert torch.allclose(a, b, atol=1e-5, rtol=0) and torch.equal(b, c)
        trainer.validate(trainer.accelerator.unwrap_model(trainer.model), 0)  # generation too brings digests
        assert cache.hashed == 0
        batch = trainer.data.batch([0], epoch=0)
        del batch["crop_keys"]  # pixels alone: the cache hashes them (pixels and patch masks, other keys)
        with torch.no_grad():
            assert torch.equal(answer_logits(trainer.model, batch), first[0])
        assert cache.hashed == len(trainer.data.sequence(trainer.data.sequences[0], 0).images)
    damaged = written[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    with trainer_for(round_files, tmp_path / "fresh", folder) as fresh:  # another task of the round: from disk
        assert [torch.allclose(a, logits_of(fresh, [s]), atol=1e-5, rtol=0) for s, a in enumerate(expected)] == [
            True] * 3
        assert fresh.vision_cache.computed == 1  # the damaged file only, written again whole
        assert damaged.stat().st_size > 1000


def test_training_through_the_cache_gives_the_gradients_of_the_plain_model(round_files, tmp_path):
    """The connector (modality projection, perceiver) after the vision model still trains: same gradients."""
    grads = []
    for cache in (None, tmp_path / "cache"):
        with trainer_for(round_files, tmp_path / str(cache is None), cache) as trainer:
            parts = trainer.losses.loss(trainer.data.batch([0, 1], epoch=0))
            trainer.accelerator.backward(parts.total)
            grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                          if p.requires_grad and p.grad is not None})
    plain, cached = grads
    assert any("connector" in n and "lora_A" in n for n in plain)
    assert plain.keys() == cached.keys()
    assert all(torch.allclose(plain[n], cached[n], atol=1e-6, rtol=1e-4) for n in plain)


def test_a_vision_model_that_trains_is_never_cached(round_files, tmp_path):
    m = load_manifest(round_files)
    enhanced = load_policy(m.model, placement="enhanced")
    assert cache_vision(enhanced, tmp_path, "vision_model") is None
    assert not any(isinstance(x, CachedVision) for x in enhanced.modules())
    paper = load_policy(m.model, placement="paper")
    assert isinstance(cache_vision(paper, tmp_path, "vision_model"), CachedVision)
    assert sum(isinstance(x, CachedVision) for x in paper.modules()) == 1


def test_qwen_trains_its_merger_so_its_vision_tower_is_never_cached(tmp_path):
    """The official placement's intent puts LoRA in Qwen2-VL's connector, the merger at the end of its vision
    tower: the tower is not frozen, and training runs without the cache (the same trainer, asked for it)."""
    root = tmp_path / "round"
    with trainer_for(write_round(root, model=multimodal_replica("qwen2.5-vl", root / "model")), tmp_path / "out",
                     tmp_path / "cache") as trainer:
        assert trainer.vision_cache is None and not (tmp_path / "cache").exists()
        trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(".visual.merger.mlp.0.lora_A" in name for name in trained)
    assert not any(".visual.blocks." in name for name in trained)
