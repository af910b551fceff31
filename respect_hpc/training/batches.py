"""A training task's examples as sequences and micro-batches, epoch by epoch.

The trained turns of a game are one sequence (game packing, data/batching.py) or one sequence a turn; each
sequence's images are shown in an order drawn per (seed, epoch, game or example) unless the manifest keeps
the logged order, letters renamed to match. A micro-batch is left-padded ids, answer spans and pixels, plus
each answer's reward, p, weight, kind (rehearsal or logged) and label.
"""

from __future__ import annotations

import polars as pl
import torch

from respect_hpc.data.batching import REHEARSAL, UNPACKED_SOURCES, epoch_batches, sequences, task_of
from respect_hpc.domain.prompts import PolicyTemplate
from respect_hpc.model.policy_inputs import Encoded, PolicyEncoder, image_order, policy_view
from respect_hpc.training.spec import TrainSpec


class TaskData:
    """One task's examples, their sequences (each encoded once up front, which checks every packed prefix
    and the image tokens against the pixels) and the micro-batches of each epoch."""

    def __init__(self, spec: TrainSpec, examples: pl.DataFrame, encoder: PolicyEncoder, template: PolicyTemplate):
        self.spec, self.encoder, self.template = spec, encoder, template
        self.examples = examples.to_dicts()
        self.sequences = sequences(examples, packing=spec.training.packing)
        self.sizes = [len(rows) for rows in self.sequences]
        encoded = [self.sequence(rows, None) for rows in self.sequences]
        if encoded:  # image tokens against pixel crops, before any model is loaded
            encoder.check(encoded[0])
        self.lengths = [len(e.input_ids) for e in encoded]
        self.tasks = [task_of(self.examples[rows[0]]["source"]) for rows in self.sequences]

    @property
    def answers_per_sequence(self) -> float:
        return sum(self.sizes) / max(len(self.sizes), 1)

    def epoch(self, epoch: int, per_step: int) -> list[list[int]]:
        """This epoch's micro-batches of sequences: D_0 and the logged turns as separate tasks, a whole number
        of steps of ``per_step`` micro-batches."""
        return epoch_batches(self.lengths, self.spec.hp.micro_batch, per_step, self.spec.seed, epoch,
                             tasks=self.tasks)

    def sequence(self, rows: list[int], epoch: int | None) -> Encoded:
        """Examples ``rows`` (one, or turns of one game) as one sequence, images in the epoch's order (one per
        game and epoch when packing; None, or ``image_order: logged``: the logged order)."""
        examples = [self.examples[i] for i in rows]
        first = examples[0]
        packed = self.spec.training.packing == "game" and first["source"] not in UNPACKED_SOURCES
        order = None
        if epoch is not None and self.spec.training.image_order == "shuffled":
            order = image_order(first["context"], self.spec.seed, epoch,
                                first["game_id"] if packed else first["game_turn_id"])
        return self.encoder.encode_game([policy_view(row, self.template, order) for row in examples])

    def answers(self, micro_batches: list[list[int]]) -> int:
        """Trained actions in ``micro_batches``."""
        return sum(self.sizes[s] for batch in micro_batches for s in batch)

    def logged_rows(self, micro_batches: list[list[int]]) -> list[dict]:
        """The logged (not rehearsal) examples of ``micro_batches``."""
        return [self.examples[i] for batch in micro_batches for s in batch for i in self.sequences[s]
                if self.examples[i]["source"] not in REHEARSAL]

    def batch(self, indices: list[int], epoch: int | None, device: torch.device | str = "cpu"
              ) -> dict[str, torch.Tensor]:
        """Sequences ``indices`` as model inputs (images in ``epoch``'s order; None: the logged order), with each
        answer's reward, p, weight and kind."""
        rows = [self.examples[i] for s in indices for i in self.sequences[s]]
        batch = self.encoder.collate([self.sequence(self.sequences[s], epoch) for s in indices])
        batch["reward"] = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
        batch["propensity"] = torch.tensor([r["prob_action"] if r["prob_action"] is not None else 1.0
                                            for r in rows], dtype=torch.float32)  # datasets.py: only D_0 lacks p
        batch["rehearsal"] = torch.tensor([r["source"] in REHEARSAL for r in rows])
        batch["desirable"] = torch.tensor([r["label"] == 1 for r in rows])
        batch["weight"] = torch.tensor([r["weight"] for r in rows], dtype=torch.float32)
        return {k: v.to(device) for k, v in batch.items()}
