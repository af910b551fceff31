"""Teach tiny random-weight replicas what a real checkpoint brings to a round, so that they behave like one.

A random-weight model answers decoder prompts with random tokens and picks tangrams at random. The demo,
the tests and the simulated setting teach a replica (full fine-tuning in plain torch, before any round):
:func:`teach_label_words` the decoder's answers to synthetic follow-ups, :func:`teach_listener` the
listener's turns on simulated games (a weak seed policy, as IDEFICS2-8B is before any round).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from respect_hpc.config.schema import ModelSection
from respect_hpc.domain.prompts import DECODER_TEMPLATES
from respect_hpc.model.loading import load_text_model, load_tokenizer

DECODER_LESSON_SKILL = 0.5  # the simulated setting's decoder learns on games of a person often wrong


def teach_label_words(folder: Path, turns, steps: int = 300, seed: int = 0) -> None:
    """Fine-tune a tiny model (all weights, plain torch) to answer decoder prompts as IDEFICS2-8B answers them.

    A random-weight model answers decoder prompts with random tokens and labels a round all
    one way; the demo and the tests teach it the label of each synthetic follow-up
    (:func:`synthetic.follow_up_label`) on ``turns`` (a turns table), written as the official
    decoder's answers (`` Positive.``, `` Neutral``, `` Negative.``) and its end of utterance.
    """
    from respect_hpc.domain.synthetic import follow_up_label
    from respect_hpc.model.chat import decoder_text, token_ids

    spec = ModelSection(path=folder, dtype="fp32")
    tokenizer, model = load_tokenizer(spec), load_text_model(spec)
    end = model.generation_config.eos_token_id
    end = end[-1] if isinstance(end, list) else end
    rows = []
    for template in DECODER_TEMPLATES.values():
        for t in turns.filter("has_follow_up").iter_rows(named=True):
            prompt = decoder_text(tokenizer, template, t["previous_action"], t["utterance"], t["action"],
                                  t["follow_up"])
            answer = template.label_answers[template.labels.index(follow_up_label(t["follow_up"], template.labels))]
            ids = token_ids(tokenizer, [prompt + answer])[0] + [end]
            rows.append((ids, len(token_ids(tokenizer, [prompt])[0])))
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):  # left-padded, so that the answers end together and only they get logits
        batch = [rows[i] for i in torch.randint(len(rows), (16,), generator=generator)]
        width = max(len(ids) for ids, _ in batch)
        keep = max(len(ids) - n for ids, n in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids, _ in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch])
        labels = torch.tensor([[-100] * (keep - len(ids) + n) + ids[n:] for ids, n in batch])
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=keep + 1).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)


def teach_decoder(folder: Path, descriptions: dict[str, list[str]], settings, games: int, steps: int) -> None:
    """Teach a replica a simulated setting's decoder: :func:`teach_label_words` for ``steps``
    steps on ``games`` simulated games of a person often wrong (``DECODER_LESSON_SKILL``: about 40% of the
    actions wrong, so that it sees rejections)."""
    import tempfile

    import polars as pl

    from respect_hpc.data.logs import ingest
    from respect_hpc.domain.simulator import human_games

    with tempfile.TemporaryDirectory() as tmp:
        lessons = Path(tmp) / "lessons.parquet"
        pl.DataFrame(human_games(games, descriptions, settings, seed=3, skill=DECODER_LESSON_SKILL)).drop(
            "truth").write_parquet(lessons)
        teach_label_words(folder, ingest([lessons], policies=None).turns, steps=steps)


def listener_examples(rng: random.Random, descriptions: dict[str, list[str]], settings, template, n: int,
                      *, skill: float = 0.7, max_history: int = 4) -> list[tuple]:
    """``n`` (game, policy view) pairs of simulated games in progress, the view's action the right one
    (:func:`~respect_hpc.domain.simulator.right_action`) after up to ``max_history`` turns of a person of ``skill``:
    first requests, confirmations, corrections, undos."""
    from respect_hpc.domain.multiref import Action, format_action, letters_of
    from respect_hpc.domain.simulator import SimulatedGame, human_action, right_action
    from respect_hpc.model.policy_inputs import policy_view

    def in_letters(game, images: tuple[frozenset[str], frozenset[str]]) -> str:
        deselect, select = images
        return format_action(Action(letters_of(deselect, game.context), letters_of(select, game.context)))

    examples = []
    while len(examples) < n:
        game = SimulatedGame.new(rng, descriptions, settings)
        actions, before = [], []
        for _ in range(rng.randint(0, max_history)):
            if game.over:
                break
            action = human_action(game, rng, skill)
            before.append(sorted(game.selection))
            actions.append(in_letters(game, action))
            game.act(*action)
        if not game.over:
            row = {"context": game.context, "chats": list(game.chat), "previous_actions": actions,
                   "previous_selections": before, "currently_selected": sorted(game.selection),
                   "action": in_letters(game, right_action(game))}
            examples.append((game, policy_view(row, template)))
    return examples


def teach_listener(folder: Path, image_folder: Path, descriptions: dict[str, list[str]], settings, *,
                   template: str, image_size: int, steps: int, seed: int = 0, batch: int = 16,
                   learning_rate: float = 1e-3) -> list[float]:
    """Fine-tune a tiny multimodal replica (all but the vision model, which stays as built) on turns of
    simulated games (:func:`listener_examples`) in the policy prompt of ``template``, descriptions from
    ``descriptions``; returns the loss of each step. ``settings``
    (:class:`~respect_hpc.domain.simulator.SpeakerSettings`) give the listener's image order and the turn limit.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForImageTextToText

    from respect_hpc.domain.prompts import policy_template
    from respect_hpc.model.loading import load_encoder
    from respect_hpc.model.policy_inputs import answer_logits
    from respect_hpc.model.vision_cache import cache_vision, vision_tower
    from respect_hpc.training.objectives import cross_entropy_loss, score_actions

    spec = ModelSection(path=folder, dtype="fp32", image_size=image_size)
    encoder = load_encoder(spec, image_folder)
    prompt = policy_template(template)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    name, vision = vision_tower(model, encoder.family.vision_tower)
    vision.requires_grad_(False)
    cache_vision(model, None, encoder.family.vision_tower)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    rng, losses = random.Random(f"teach-listener/{seed}"), []
    model.train()
    with Progress(TextColumn("teaching the listener"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        for _ in progress.track(range(steps)):
            examples = listener_examples(rng, descriptions, settings, prompt, batch)
            inputs = encoder.collate([encoder.encode(view) for _, view in examples])
            scores = score_actions(answer_logits(model, inputs), inputs["targets"], inputs["target_mask"])
            loss = cross_entropy_loss(scores, label_smoothing=0.0).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    model.set_submodule(name, vision)  # the vision model as built, not its cache
    model.eval()
    model.save_pretrained(folder)
    return losses
