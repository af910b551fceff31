"""Seeded synthetic MultiRef logs in the public ``interaction`` layout.

For tests, benchmarks and the demo on a machine without real logs. Speakers
describe targets, approve good actions, correct bad ones ("no, not the bird",
"try again", "the other one") and sometimes reset; the listener policy picks the
described target with a probability given by its skill. Images and descriptions
are the real KiloGram tangrams when that folder exists, procedurally drawn
shapes with made-up names otherwise.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from respect_hpc.domain.multiref import DEFAULT_MAX_TURNS

DEFAULT_KILOGRAM = Path(__file__).resolve().parents[3] / "shared" / "data" / "kilogram"

APPROVALS = ["yes", "good", "correct", "great", "okay", "perfect", "nice", "yes!", "good job"]
NEXT = ["now", "next", "and", "now pick", "next one is", "also"]
CORRECTIONS = ["no, not the {wrong}", "no, that's not it, I meant the {target}", "wrong one, undo that",
               "not that one, the {target}", "no", "don't pick the {wrong}"]
TRY_AGAIN = ["try again", "try one more time", "the other one", "no, try again, the {target}"]
RESETS = ["reset", "let's start over", "deselect everything and start over", "clear all and restart",
          "remove all, from scratch"]

_NEGATIVE_WORDS = {"no", "not", "wrong", "undo", "don't", "reset", "restart", "over", "scratch", "again", "other",
                   "remove", "clear", "meant", "deselect", "try"}
_APPROVAL_WORDS = {"yes", "good", "correct", "great", "okay", "perfect", "nice", "yes!"}
_MOVE_ON_WORDS = {"now", "next", "and", "also", "pick", "select"}
_SHAPES = ["bird", "dog", "person", "house", "chair", "boat", "rabbit", "rocket", "cat", "tree", "fish",
           "snake", "robot", "arrow", "hat", "dancer", "swan", "runner", "lamp", "duck"]
_TRAITS = ["tall", "sitting", "kneeling", "flying", "fat", "thin", "upside down", "running", "tiny",
           "leaning", "jumping", "sleeping"]


@dataclass(frozen=True)
class ImageBank:
    """Image file names and a few descriptions of each."""

    descriptions: dict[str, list[str]]
    source: str  # "kilogram" or "procedural"

    @property
    def names(self) -> list[str]:
        return sorted(self.descriptions)


def _strip_article(description: str) -> str:
    words = description.strip().lower().split()
    return " ".join(words[1:] if words[:1] in (["a"], ["an"], ["the"]) else words)


def load_image_bank(kilogram: Path | None = DEFAULT_KILOGRAM, dense: str = "dense10.json") -> ImageBank:
    """The annotated KiloGram tangrams (``dense``: 10 descriptions each, or dense.json's about 50), or
    procedural ones when the folder is absent."""
    dense = kilogram / dense if kilogram else None
    if dense and dense.is_file():
        data = json.loads(dense.read_text())
        return ImageBank({f"{name}.png": [_strip_article(a["whole"]["wholeAnnotation"])
                                          for a in entry["annotations"] if _strip_article(a["whole"]["wholeAnnotation"])]
                          for name, entry in data.items()}, "kilogram")
    rng = random.Random(0)
    bank = {}
    for i in range(74):
        shape = _SHAPES[i % len(_SHAPES)]
        bank[f"synth-{i:03d}.png"] = [f"{rng.choice(_TRAITS)} {shape}", shape, f"{rng.choice(_TRAITS)} {shape}"]
    return ImageBank(bank, "procedural")


def draw_procedural_images(bank: ImageBank, folder: Path, size: int = 224) -> None:
    """Draw a seeded black polygon figure for every image of a procedural bank."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for name in bank.names:
        rng = random.Random(name)
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        for _ in range(7):  # seven pieces, like a tangram
            cx, cy = rng.uniform(0.25, 0.75) * size, rng.uniform(0.25, 0.75) * size
            points = [(cx + rng.uniform(-0.18, 0.18) * size, cy + rng.uniform(-0.18, 0.18) * size) for _ in range(3)]
            draw.polygon(points, fill="black")
        image.save(folder / name)


def _describe(rng: random.Random, bank: ImageBank, image: str) -> str:
    return rng.choice(bank.descriptions[image])


def _utterance(rng: random.Random, bank: ImageBank, good: bool | None, target: str | None,
               wrong: str | None, reset: bool) -> str:
    """What the speaker says: feedback on the last action, then the next request."""
    if reset:
        return rng.choice(RESETS)
    request = f"the {_describe(rng, bank, target)}" if target else ""
    if good is None:
        return rng.choice(["", "select ", "pick "]) + request
    if good:
        approval = rng.choice(APPROVALS) if rng.random() < 0.8 else ""
        nxt = f"{rng.choice(NEXT)} {request}" if request else "that's all"
        return f"{approval}, {nxt}" if approval else nxt
    template = rng.choice(TRY_AGAIN if rng.random() < 0.3 else CORRECTIONS)
    return template.format(wrong=_describe(rng, bank, wrong) if wrong else "last one",
                           target=_describe(rng, bank, target) if target else "other one")


def play_game(rng: random.Random, bank: ImageBank, skill: float, max_turns: int = DEFAULT_MAX_TURNS) -> dict:
    """One game: context, targets, utterances, selections after each turn, p of each action."""
    context = rng.sample(bank.names, 10)
    targets = rng.sample(context, rng.randint(3, 5))
    selection: set[str] = set()
    chat, clicks, probs = [], [], []
    good: bool | None = None
    last_wrong: str | None = None
    for _ in range(max_turns):
        wrong_selected = sorted(selection - set(targets))
        remaining = [t for t in targets if t not in selection]
        reset = good is False and len(wrong_selected) >= 2 and rng.random() < 0.5
        target = rng.choice(remaining) if remaining else None
        chat.append(_utterance(rng, bank, good, target, last_wrong, reset))
        deselect: set[str] = set()
        if reset:
            deselect = set(selection)
        elif wrong_selected and good is False and rng.random() < skill:
            deselect = set(wrong_selected)
        candidates = [img for img in context if img not in selection]
        pick = target if (target and rng.random() < skill) else rng.choice(candidates)
        select = {pick} if pick not in selection - deselect and not reset else set()
        if not select and not deselect:  # the listener always clicks something
            select = {rng.choice(candidates)}
        selection = (selection - deselect) | select
        chosen_ok = all(img in targets for img in select) and not (deselect & set(targets))
        good = chosen_ok if (select or deselect) else False
        last_wrong = next(iter(select - set(targets)), None)
        probs.append(round(rng.uniform(0.5, 0.95) if chosen_ok else rng.uniform(0.05, 0.5), 4))
        clicks.append(sorted(selection))
        if selection == set(targets):
            break
    return {"context": context, "targets": sorted(targets), "chat": chat, "clicks": clicks,
            "prob_action": probs, "success": set(selection) == set(targets)}


def synthesize(n_games: int, *, seed: int = 0, policies: dict[str, float] | None = None,
               rounds: list[int] | tuple[int, ...] = (0,), bank: ImageBank | None = None,
               max_turns: int = DEFAULT_MAX_TURNS, skill_gain: float = 0.08) -> pl.DataFrame:
    """``n_games`` per (policy, round), in the public interaction layout.

    ``policies`` maps a policy name to its round-0 skill; skill grows by
    ``skill_gain`` per round (capped at 0.95), like a policy that learns.
    """
    bank = bank or load_image_bank()
    policies = policies or {"sft": 0.45}
    rows = []
    for policy, base_skill in policies.items():
        for round_ in rounds:
            rng = random.Random(f"{seed}/{policy}/{round_}")
            skill = min(0.95, base_skill + skill_gain * round_)
            for i in range(n_games):
                game = play_game(rng, bank, skill, max_turns)
                rows.append({
                    "game_id": f"{policy}-r{round_}-{seed}-{i:06d}", "turn": len(game["chat"]),
                    "end": "successful" if game.pop("success") else "unsuccessful",
                    "speaker": f"speaker-{rng.randrange(40)}", "len": len(game["chat"]), **game,
                    "dataset_alias": f"synthetic-{bank.source}", "policy_name": policy,
                    "date": f"2026-{1 + round_ % 12:02d}-01", "round": round_,
                })
    return pl.DataFrame(rows, schema_overrides={"prob_action": pl.List(pl.Float64)})


def to_public_turn_layout(turns: pl.DataFrame) -> pl.DataFrame:
    """A turns table (:data:`tables.TURNS`) in the public ``turn`` layout, ``clicks`` as the official generator
    writes it: the images toggled in each turn so far."""
    toggled = pl.col("selected").list.concat("deselected").list.sort()
    return turns.sort("game_id", "turn_id").select(
        "game_turn_id", "game_id", "turn_id", "chats",
        toggled.implode().over("game_id").list.head(pl.col("turn_id") + 1).alias("clicks"),
        "currently_selected", "selected", "deselected",
        pl.col("follow_up").alias("chat_feedback"), "prob_action", "context", "targets",
        pl.col("game_success").cast(pl.Int64).alias("end"),
        pl.lit("synthetic").alias("dataset_alias"), pl.col("policy").alias("policy_name"),
        pl.lit(None, pl.String).alias("date"), "round",
    )


def follow_up_label(follow_up: str, labels: tuple[str, ...]) -> str:
    """The label word a follow-up means by its words, read as the official decoder prompts ask (what a tiny
    decoder is taught to answer): corrections and negative keywords are negative; approval words, or simply
    moving on to the next request, positive; anything that sounds neutral is neutral where that is a label,
    else negative (the binary prompt's "Lean towards negative if it sounds neutral")."""
    words = set(follow_up.lower().replace(",", " ").split())
    if words & _NEGATIVE_WORDS:
        return "Negative"
    if words & (_APPROVAL_WORDS | _MOVE_ON_WORDS):
        return "Positive"
    return "Neutral" if "Neutral" in labels else "Negative"
