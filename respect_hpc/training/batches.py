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
from respect_hpc.data.datasets import negative_draws
from respect_hpc.domain.prompts import PolicyTemplate
from respect_hpc.model.policy_inputs import Encoded, PolicyEncoder, image_order, policy_view
from respect_hpc.training.spec import TrainSpec

Batch = dict[str, torch.Tensor | list[str]]  # tensors, and the crops' digests ("crop_keys") that stay on the host


def to_device(batch: Batch, device: torch.device | str, non_blocking: bool = False) -> Batch:
    """A micro-batch's tensors on ``device`` (the crops' digests stay where they are: only the host reads them)."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pinned(batch: Batch) -> Batch:
    """A micro-batch's tensors in pinned host memory (for an asynchronous copy to a GPU)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class TaskData:
    """One task's examples, their sequences (each encoded once up front, which checks every packed prefix
    and the image tokens against the pixels) and the micro-batches of each epoch.

    With ``negatives: per_epoch`` (RL and KTO) each epoch trains every positive and a fresh draw of
    negatives (``negatives_per_5_positives`` per 5 positives, seeded by seed and epoch): an epoch's sequences
    are the task's sequences with the negatives not drawn left out (a sequence left empty is dropped)."""

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
        self.drawn = negative_draws(examples, spec.hp, spec.objective, spec.seed)
        self._views: dict[int, list[tuple[int, list[int]]]] = {}

    @property
    def answers_per_sequence(self) -> float:
        return sum(self.sizes) / max(len(self.sizes), 1)

    def _view(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(index of the whole sequence, its rows trained in ``epoch``) for each sequence the epoch keeps."""
        if epoch not in self._views:
            kept = self.drawn(epoch)
            self._views[epoch] = [(k, rows) for k, seq in enumerate(self.sequences)
                                  if (rows := [i for i in seq if i in kept])]
        return self._views[epoch]

    def sequences_of(self, epoch: int | None) -> list[list[int]]:
        """The epoch's sequences (example rows each): all of them, or with negatives drawn per epoch, each
        without the negatives this epoch leaves out."""
        if self.drawn is None or epoch is None:
            return self.sequences
        return [rows for _, rows in self._view(epoch)]

    def epoch(self, epoch: int, per_step: int) -> list[list[int]]:
        """This epoch's micro-batches (indices into :meth:`sequences_of` the epoch): D_0 and the logged turns
        as separate tasks, a whole number of steps of ``per_step`` micro-batches. Length grouping uses each
        sequence's whole length (a sequence missing a negative is a little shorter)."""
        whole = range(len(self.sequences)) if self.drawn is None else [k for k, _ in self._view(epoch)]
        return epoch_batches([self.lengths[k] for k in whole], self.spec.hp.micro_batch, per_step, self.spec.seed,
                             epoch, tasks=[self.tasks[k] for k in whole])

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

    def answers(self, micro_batches: list[list[int]], epoch: int | None) -> int:
        """Trained actions in ``micro_batches`` of ``epoch``."""
        seqs = self.sequences_of(epoch)
        return sum(len(seqs[s]) for batch in micro_batches for s in batch)

    def logged_rows(self, micro_batches: list[list[int]], epoch: int | None) -> list[dict]:
        """The logged (not rehearsal) examples of ``micro_batches`` of ``epoch``."""
        seqs = self.sequences_of(epoch)
        return [self.examples[i] for batch in micro_batches for s in batch for i in seqs[s]
                if self.examples[i]["source"] not in REHEARSAL]

    def batch(self, indices: list[int], epoch: int | None, device: torch.device | str = "cpu") -> Batch:
        """Sequences ``indices`` of ``epoch`` as model inputs (images in ``epoch``'s order; None: every sequence
        whole, in the logged order), with each answer's reward, p, weight and kind."""
        seqs = self.sequences_of(epoch)
        rows = [self.examples[i] for s in indices for i in seqs[s]]
        batch = self.encoder.collate([self.sequence(seqs[s], epoch) for s in indices])
        batch["reward"] = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
        batch["propensity"] = torch.tensor([r["prob_action"] if r["prob_action"] is not None else 1.0
                                            for r in rows], dtype=torch.float32)  # datasets.py: only D_0 lacks p
        batch["rehearsal"] = torch.tensor([r["source"] in REHEARSAL for r in rows])
        batch["desirable"] = torch.tensor([r["label"] == 1 for r in rows])
        batch["weight"] = torch.tensor([r["weight"] for r in rows], dtype=torch.float32)
        return to_device(batch, device)
