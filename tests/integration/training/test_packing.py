"""Game packing computes what one sequence per turn computes (IDEFICS2-8B and SmolVLM replicas, real tangram images):
every answer's log-probability, entropy term and loss under each objective, and the adapter a few optimizer
steps over the same actions give.

The two ways sum the same terms in other orders, so they differ by rounding alone. The comparisons run in
float64 (rounding 2**-52, about 2e-16 of a value), except where the model itself computes in float32 whatever
its dtype (its RMS norms): there a last-bit difference can flip a float32 rounding, 2**-24 (6e-8) of that
value. Log-probabilities and losses here are sums of a few terms of magnitude at most about 10, so rounding
moves them by well under 1e-6, the bound used; a real difference (a wrong mask, a misplaced answer) moves them
by tenths. These bounds hold on any CPU, with or without AVX-512, whose kernels sum in other orders."""


import pytest
import torch
from conftest import MULTIMODAL, multimodal_replica, write_round

import jobs.train
from respect_hpc.config.loading import load_manifest
from respect_hpc.core.rundir import TaskDir
from respect_hpc.model.policy_inputs import answer_logits, policy_view
from respect_hpc.training.objectives import score_actions
from respect_hpc.training.spec import TrainSpec
from respect_hpc.training.trainer import Trainer

VARIANTS = {"b-fft": "fft", "t-rl": "rl", "b-kto": "kto"}


@pytest.fixture(scope="module", params=MULTIMODAL)
def round_files(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("packing")
    model = multimodal_replica(request.param, root / "model")
    variants = ("[{name: b-fft, feedback: binary, objective: fft}, {name: t-rl, feedback: ternary, objective: rl},"
                " {name: b-kto, feedback: binary, objective: kto, init: base}]")
    return write_round(root, variants=variants, model=model)


def trainer_for(round_files, variant, out, packing, image_order="shuffled"):
    m = load_manifest(round_files)
    v = jobs.train.variant_of(m, variant)
    prepared = jobs.train.prepare(m, variant, 1)
    hp = m.objective(v).model_copy(update={"lora_dropout": 0.0, "learning_rate": 1e-3, "warmup_steps": 0,
                                           "beta": 0.05})
    training = m.training.model_copy(update={"zero_stage": None, "packing": packing, "image_order": image_order})
    spec = TrainSpec(objective=v.objective, hp=hp, seed=1, model=m.model, policy_template=m.policy_template,
                     images=m.data.images, out=TaskDir(out), training=training, collecting=prepared.spec.collecting)
    jobs.train.set_distributed_env()
    trainer = Trainer(spec, prepared.examples, prepared.validation)
    trainer.model.double()  # in place: the optimizer keeps the same parameters, now float64
    return trainer


def games(trainer, count):
    """The first ``count`` packed sequences of logged turns with more than one answer."""
    chosen = [s for s, rows in enumerate(trainer.data.sequences)
              if len(rows) > 1 and trainer.data.examples[rows[0]]["source"] == "log"][:count]
    assert len(chosen) == count
    return chosen


def lora_noise(trainer):
    """LoRA B starts at zero: random values make every adapted layer count."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=generator)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_games_give_every_answer_the_log_probability_and_loss_of_its_own_sequence(round_files, variant,
                                                                                         tmp_path):
    with trainer_for(round_files, variant, tmp_path, "game") as trainer:
        lora_noise(trainer)
        trainer.model.eval()
        chosen = games(trainer, 3)
        packed = trainer.data.batch(chosen, epoch=None)
        rows = [trainer.data.examples[i] for s in chosen for i in trainer.data.sequences[s]]
        single = {**packed, **{k: v for k, v in trainer.data.encoder.collate(
            [trainer.data.encoder.encode(policy_view(row, trainer.data.template)) for row in rows]).items()}}
        assert packed["input_ids"].shape[0] == 3 and single["input_ids"].shape[0] == len(rows) > 3
        assert packed["attention_mask"].sum() * 2 < single["attention_mask"].sum()  # the point of packing
        assert torch.equal(packed["targets"], single["targets"])
        z = torch.tensor(0.3)
        with torch.no_grad():
            scores = [score_actions(answer_logits(trainer.model, b), b["targets"], b["target_mask"])
                      for b in (packed, single)]
            losses = [trainer.losses.action_losses(b, z)[0] for b in (packed, single)]
        assert scores[0].logprob.dtype == torch.float64
        assert torch.allclose(scores[0].logprob, scores[1].logprob, atol=1e-6, rtol=0)
        assert torch.allclose(scores[0].uniform, scores[1].uniform, atol=1e-6, rtol=0)
        assert torch.allclose(losses[0], losses[1], atol=1e-6, rtol=0), (losses[0] - losses[1]).abs().max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_few_optimizer_steps_over_the_same_actions_give_the_same_adapter(round_files, variant, tmp_path):
    adapters, losses = [], []
    for packing in ("game", "turn"):
        with trainer_for(round_files, variant, tmp_path / packing, packing) as trainer:
            if packing == "game":
                chosen = games(trainer, 2)
                actions = [i for s in chosen for i in trainer.data.sequences[s]]
            else:  # one sequence per example: sequence s is example s
                chosen = actions
            batch = trainer.data.batch(chosen, epoch=None)
            # plain SGD: its update is the gradient times the learning rate, so the two ways' adapters differ by
            # what their gradients differ by (see below), where Adam and RMSprop would amplify rounding noise
            sgd = torch.optim.SGD([p for p in trainer.model.parameters() if p.requires_grad], lr=0.5)
            seen = []
            for _ in range(3):
                z = trainer.losses.reference_point([chosen], None) if variant == "b-kto" else None
                # as Trainer.run scales it: Accelerate divides each micro-batch's loss by the accumulation steps
                parts = trainer.losses.loss(batch, z, scale=trainer.per_step / len(actions))
                seen.append(parts.total.item() / trainer.per_step)  # the mean over the actions, as reported
                trainer.accelerator.backward(parts.total)
                sgd.step()
                sgd.zero_grad()
            losses.append(seen)
            adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    packed, single = adapters
    moved = max((p.abs().max() for n, p in single.items() if "lora_B" in n))
    assert moved > 1e-4  # the steps trained
    # Each step moves a parameter by lr x its gradient, and the two ways' gradients differ by rounding: at
    # most a float32 rounding (6e-8) of the gradient where the model computes in float32, float64's elsewhere.
    # Over three steps the adapters then differ by well under 1e-5 of how far the steps moved them; the bound
    # is ten times that. (Adam and RMSprop divide each component by the root of its squared history, so a
    # component whose gradient is pure rounding noise moves by about the learning rate either way: compared
    # under them, the adapters differed by up to 1e-3 of their movement, CPU by CPU.)
    difference = max((packed[n] - single[n]).abs().max() for n in single)
    assert difference < 1e-4 * moved, (difference, moved)


def test_the_manifest_chooses_the_packing_and_a_change_is_a_new_task(round_files, tmp_path):
    m = load_manifest(round_files)
    assert jobs.train.prepare(m, "b-fft", 1).spec.training.packing == "game"  # the default
    per_turn = tmp_path / "turn.yaml"
    per_turn.write_text(round_files.read_text().replace("  zero_stage: null", "  zero_stage: null\n  packing: turn"))
    turn = load_manifest(per_turn)
    assert jobs.train.prepare(turn, "b-fft", 1).spec.training.packing == "turn"
    assert jobs.train.task_hash(turn, "b-fft", 1) != jobs.train.task_hash(m, "b-fft", 1)


def test_a_logged_image_order_trains_every_example_in_the_order_the_listener_saw(round_files, tmp_path):
    shuffled = trainer_for(round_files, "b-fft", tmp_path / "shuffled", "game")
    logged = trainer_for(round_files, "b-fft", tmp_path / "logged", "game", image_order="logged")
    moved = 0
    for s in games(logged, 3):
        context = logged.data.examples[logged.data.sequences[s][0]]["context"]
        for epoch in (0, 1):
            assert logged.data.sequence(logged.data.sequences[s], epoch).images[:10] == context
            moved += shuffled.data.sequence(shuffled.data.sequences[s], epoch).images[:10] != context
    assert moved >= 5  # the official way draws an order per game and epoch
