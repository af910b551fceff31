"""Each trained action's loss, by the variant's objective, and KTO's reference point (objectives.py has the
formulas; this module feeds them the model's scores of a micro-batch).

D_0's rows are trained with label-smoothed cross-entropy whatever the objective; logged rows by the
variant's: FFT cross-entropy (label smoothing = the entropy weight), REINFORCE or KTO. KTO's z is measured
once per optimizer step, before its update, on a mismatched single click of each of the step's logged
examples (the policy in training mode, as the official), against the scores of the same clicks under the
policy that logged each example (computed once per task and kept in the task folder).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from respect_hpc.core.io import atomic_write_parquet
from respect_hpc.data.batching import REHEARSAL
from respect_hpc.domain.multiref import letters_of, mismatched_click
from respect_hpc.model.policy_inputs import answer_logits, policy_view
from respect_hpc.training.batches import TaskData, to_device
from respect_hpc.training.objectives import ActionScores, cross_entropy_loss, kto_loss, reinforce_loss, score_actions
from respect_hpc.training.spec import TrainSpec


@dataclass(frozen=True)
class LossParts:
    """A micro-batch's loss (its share of the step's mean over answers, scaled for accumulation), the mean
    loss of its logged actions (D_0 rows left out; 0 without any) and the mean entropy term U, for the
    metrics table."""

    total: torch.Tensor
    objective: torch.Tensor
    entropy: torch.Tensor


def click_logprobs(model, rows: list[dict], data: TaskData, hp, device) -> list[float]:
    """log pi(a'|x) under ``model`` as it is (its mode, its active adapter) of each row's mismatched click:
    the first image of the logged order (the second where the logged action was that click), selected or
    deselected by the current state (objectives.mismatched_click); over the click's tokens where
    ``hp.kto_length_normalised``."""
    values = []
    for start in range(0, len(rows), hp.micro_batch):
        chunk = [{**row, "action": mismatched_click(row["action"], letters_of(row["currently_selected"],
                                                                              row["context"]))}
                 for row in rows[start:start + hp.micro_batch]]
        encoded = [data.encoder.encode(policy_view(row, data.template)) for row in chunk]
        batch = to_device(data.encoder.collate(encoded), device)
        scores = score_actions(answer_logits(model, batch), batch["targets"], batch["target_mask"], hp.temperature)
        values += (scores.logprob / scores.length if hp.kto_length_normalised else scores.logprob).tolist()
    return values


REFERENCE_ADAPTER = "collecting"  # the name a collecting policy's adapter is loaded under, beside "default"


@torch.no_grad()
def collecting_reference(model, spec: TrainSpec, data: TaskData, accelerator) -> dict[str, float]:
    """KTO's reference for the mismatched clicks, by game_turn_id: each logged example's click scored once
    under the policy that logged it (``spec.collecting``: its adapter, loaded beside the task's own on the
    same base model), in eval mode and the logged image order, as the official annotation precomputes it;
    kept in the task folder (the main process writes it, the others read it). ``model``: the task's PEFT
    model before Accelerate or DeepSpeed wraps it."""
    path = spec.out.mismatch_reference
    with accelerator.main_process_first():
        if not path.is_file():
            logged = [row for row in data.examples if row["source"] not in REHEARSAL]
            values: dict[str, float] = {}
            was_training = model.training
            model.eval()
            for (policy, round_), adapter in sorted(spec.collecting.items()):
                rows = [row for row in logged if (row["policy"], row["round"]) == (policy, round_)]
                model.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
                model.set_adapter(REFERENCE_ADAPTER)
                try:
                    scores = click_logprobs(model, rows, data, spec.hp, accelerator.device)
                finally:
                    model.set_adapter("default")
                    model.delete_adapter(REFERENCE_ADAPTER)
                values.update(zip((row["game_turn_id"] for row in rows), scores))
            model.train(was_training)
            atomic_write_parquet(pl.DataFrame({"game_turn_id": list(values), "logprob": list(values.values())},
                                              schema={"game_turn_id": pl.String, "logprob": pl.Float64}), path)
    table = pl.read_parquet(path)
    return dict(zip(table["game_turn_id"], table["logprob"]))


class Losses:
    """The losses of one task's micro-batches under its model (``model()`` returns it unwrapped);
    ``reference``: KTO's collecting-policy scores of the mismatched clicks (:func:`collecting_reference`)."""

    def __init__(self, spec: TrainSpec, data: TaskData, accelerator, model, reference: dict[str, float] | None = None):
        self.spec, self.hp, self.data = spec, spec.hp, data
        self.accelerator, self.model = accelerator, model
        self.mismatch_reference = reference or {}

    def action_losses(self, batch: dict[str, torch.Tensor], z: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, ActionScores]:
        """Each answer's loss: D_0 rows by label-smoothed cross-entropy, logged rows by the variant's objective;
        ``z``: KTO's reference point for this step."""
        hp = self.hp
        scores = score_actions(answer_logits(self.model, batch), batch["targets"], batch["target_mask"],
                               hp.temperature)
        rehearsal = batch["rehearsal"].to(scores.logprob.device)
        if self.spec.objective == "rl":
            per_action = reinforce_loss(scores, batch["reward"], batch["propensity"], entropy_weight=hp.entropy_weight)
        elif self.spec.objective == "kto":
            per_action = kto_loss(scores, batch["propensity"], batch["desirable"], batch["weight"], z=z, beta=hp.beta,
                                  entropy_weight=hp.entropy_weight, length_normalised=hp.kto_length_normalised)
        else:  # fft (the seed round's rows are all D_0)
            per_action = cross_entropy_loss(scores, label_smoothing=hp.entropy_weight)
        return torch.where(rehearsal, cross_entropy_loss(scores, label_smoothing=hp.label_smoothing),
                           per_action), scores

    def loss(self, batch: dict[str, torch.Tensor], z: torch.Tensor | None = None, scale: float = 1.0) -> LossParts:
        """The micro-batch's answers' summed loss times ``scale`` (the step's micro-batches over its answers:
        the step's gradient is then its mean over answers)."""
        per_action, scores = self.action_losses(batch, z)
        logged = per_action.detach()[~batch["rehearsal"].to(per_action.device)]
        return LossParts(per_action.sum() * scale, logged.mean() if logged.numel() else torch.zeros(()),
                         scores.uniform.detach().mean())

    # -- KTO's reference point -------------------------------------------------------------------------
    def mismatch_logprobs(self, rows: list[dict]) -> list[float]:
        """log pi(a'|x) of each row's mismatched click under the model as it is, in training mode (dropout on,
        as the official code measures z inside its training step), without gradients, in the logged image
        order, as the reference was scored: z then measures the policy, not the shuffling."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.train()
        with torch.no_grad():
            values = click_logprobs(model, rows, self.data, self.hp, self.accelerator.device)
        model.train(was_training)
        return values

    def reference_point(self, micro_batches: list[list[int]], epoch: int) -> torch.Tensor:
        """KTO's z for one optimizer step, before its update, over every process's logged examples of the step."""
        rows = self.data.logged_rows(micro_batches, epoch)
        now = self.mismatch_logprobs(rows)
        difference = sum(n - self.mismatch_reference[r["game_turn_id"]] for n, r in zip(now, rows))
        values = torch.tensor([difference, float(len(rows))], device=self.accelerator.device)
        total, count = self.accelerator.reduce(values, "sum").tolist()
        return torch.tensor(max(0.0, total / count) if count else 0.0)
