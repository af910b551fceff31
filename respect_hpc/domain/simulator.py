"""A simulated MultiRef speaker on real stimuli, for deployments without people (pure, seeded).

A game shows 10 of the tangrams in play, 3 to 5 of them targets, in the listener's order (drawn per game,
or the tangrams' name order). The speaker asks for one remaining target at a time with
a human description of it (KiloGram's, from the description pool the settings name), then reacts to each
action of the listener the way people do in the MultiRef logs: an action that selected only targets (or
deselected only wrong images) is confirmed and the next target asked for (with ``credit: asked``, only a
selection of the target asked for; another target stays selected and is corrected); a wrong selection is
corrected ("no, not the bird"), asked to be undone or met with "try again"; an action that did nothing is
asked again. Some reactions carry no explicit approval or rejection (``implicit``: just the next request, or a
correction without a "no"), some say the opposite of the truth (``misleading``) and some say nothing
useful (``silent``). The game ends on success (exactly the targets selected) or at the turn limit. Each
turn keeps the truth (was the action good), against which decoded feedback is measured.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from respect_hpc.domain.multiref import DEFAULT_MAX_TURNS, Action, ActionError, apply_action, game_over, images_of

APPROVALS = ("yes", "good", "correct", "great", "perfect", "nice", "yes!", "good job")
NEXT = ("now", "next", "and", "now pick", "next one is", "also")
CORRECTIONS = ("no, not the {wrong}", "no, that's not it, I meant the {target}", "not that one, the {target}",
               "no", "don't pick the {wrong}")
IMPLICIT_CORRECTIONS = ("the {target}", "I meant the {target}", "the other one")
UNDO = ("wrong one, undo that", "remove the {wrong}", "deselect the {wrong}", "no, undo that")
TRY_AGAIN = ("try again", "try one more time", "no, try again, the {target}")
SILENT = ("", "hmm", "ok let me see", "wait")
POOLS = ("seed", "deploy", "all")
ORDERS = ("shuffled", "fixed")
CREDITS = ("target", "asked")


@dataclass(frozen=True)
class SpeakerSettings:
    """The simulator's knobs; defaults are close to what the MultiRef logs show."""

    implicit: float = 0.3     # reactions without an approval or rejection word
    misleading: float = 0.05  # reactions that say the opposite of the truth
    silent: float = 0.05      # reactions that say nothing useful
    undo: float = 0.35        # after a wrong selection: ask to undo it (else correct it, or "try again")
    pool: str = "deploy"      # descriptions: "seed" (even-numbered), "deploy" (odd-numbered, held out), "all"
    max_turns: int = DEFAULT_MAX_TURNS
    order: str = "shuffled"   # the listener's image order: drawn per game, or "fixed" (the tangrams' name order)
    credit: str = "target"    # approved selections: any target, or "asked" (only the tangram asked for)

    def __post_init__(self) -> None:
        for name in ("implicit", "misleading", "silent", "undo"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"simulation.{name}: a probability in [0, 1], got {getattr(self, name)}")
        if self.pool not in POOLS:
            raise ValueError(f"simulation.pool: one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.order not in ORDERS:
            raise ValueError(f"simulation.order: one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.credit not in CREDITS:
            raise ValueError(f"simulation.credit: one of {', '.join(CREDITS)}, got {self.credit!r}")


def description_pool(descriptions: dict[str, list[str]], pool: str, tangrams: int | None = None,
                     per_image: int | None = None) -> dict[str, list[str]]:
    """Each image's descriptions in ``pool`` (the seed half, the held-out deployment half, or all) of its first
    ``per_image`` (all by default), for the first ``tangrams`` images by name (all by default): the tangrams
    in play. A speaker names a target so that it can be told apart: a description that KiloGram also gives
    another tangram in play ("man", "bird") is never spoken, and a repeated one counts once."""
    in_play = sorted(descriptions)[:tangrams]
    if len(in_play) < 10:
        raise ValueError(f"simulation.tangrams: a game shows 10 tangrams, {len(in_play)} are in play")
    if per_image is not None and per_image < 2:
        raise ValueError(f"simulation.descriptions: at least 2 a tangram (one a half), got {per_image}")
    own = {image: _distinct(descriptions[image]) for image in in_play}
    named = Counter(key for texts in own.values() for key in texts)
    spoken = {image: [t for key, t in texts.items() if named[key] == 1][:per_image] for image, texts in own.items()}
    if few := sorted(image for image, texts in spoken.items() if len(texts) < 2):
        raise ValueError(f"simulation: tangram {few[0]} has fewer than 2 descriptions no other tangram in play "
                         f"has")
    if pool == "all":
        return spoken
    start = 0 if pool == "seed" else 1
    return {image: texts[start::2] for image, texts in spoken.items()}


def _distinct(texts: list[str]) -> dict[str, str]:
    """Each description once, in order, by its text regardless of case and spaces around it."""
    first: dict[str, str] = {}
    for text in texts:
        first.setdefault(text.strip().lower(), text.strip())
    return first


@dataclass
class SimulatedGame:
    """One game in progress: the speaker's state and what was said and done so far."""

    context: list[str]
    targets: frozenset[str]
    descriptions: dict[str, list[str]]
    settings: SpeakerSettings
    rng: random.Random
    selection: frozenset[str] = frozenset()
    chat: list[str] = field(default_factory=list)
    truths: list[int] = field(default_factory=list)  # per acted turn: 1 good, -1 bad, 0 nothing done
    asked: str | None = None  # the target the speaker asked for last

    @classmethod
    def new(cls, rng: random.Random, descriptions: dict[str, list[str]], settings: SpeakerSettings
            ) -> SimulatedGame:
        context = rng.sample(sorted(descriptions), 10)
        if settings.order == "fixed":
            context.sort()
        game = cls(context, frozenset(rng.sample(context, rng.randint(3, 5))), descriptions, settings, rng)
        game.chat.append(game._request(""))
        return game

    @property
    def over(self) -> bool:
        return game_over(self.selection, self.targets, len(self.truths), self.settings.max_turns)

    def _describe(self, image: str) -> str:
        return self.rng.choice(self.descriptions[image])

    def _request(self, prefix: str) -> str:
        remaining = sorted(self.targets - self.selection)
        self.asked = self.rng.choice(remaining) if remaining else None
        request = f"the {self._describe(self.asked)}" if self.asked else "that's all"
        return f"{prefix} {request}".strip()

    def _fill(self, template: str, wrong: str | None) -> str:
        return template.format(wrong=self._describe(wrong) if wrong else "last one",
                               target=self._describe(self.asked) if self.asked else "other one")

    def act(self, deselect: frozenset[str], select: frozenset[str]) -> str | None:
        """The listener's action (images); returns the speaker's reaction, or None when the game is over."""
        try:  # an action that clicks what it cannot (selects what is selected...) does nothing
            after = apply_action(self.selection, Action(deselect, select))
        except ActionError:
            after = None
        done = bool(select or deselect) and after is not None
        good = done and select <= self.targets and not (deselect & self.targets)
        if good and select and self.settings.credit == "asked":
            good = select == {self.asked}  # another target stays selected but is corrected
        if done:
            self.selection = after
        self.truths.append(1 if good else -1 if done else 0)
        if self.over:
            return None
        rng, s = self.rng, self.settings
        if rng.random() < s.silent:
            reaction = rng.choice(SILENT)
        else:
            approve = bool(good) != (rng.random() < s.misleading)
            reaction = self._approval(rng, s) if approve else self._rejection(rng, s, select - self.targets)
        self.chat.append(reaction)
        return reaction

    def _approval(self, rng: random.Random, s: SpeakerSettings) -> str:
        explicit = rng.random() >= s.implicit
        prefix = f"{rng.choice(APPROVALS)}, {rng.choice(NEXT)}" if explicit else rng.choice(NEXT)
        return self._request(prefix)

    def _rejection(self, rng: random.Random, s: SpeakerSettings, wrong_selected: frozenset[str]) -> str:
        wrong = rng.choice(sorted(wrong_selected)) if wrong_selected else None
        if rng.random() < s.implicit:
            return self._fill(rng.choice(IMPLICIT_CORRECTIONS), wrong)
        if wrong and rng.random() < s.undo:
            return self._fill(rng.choice(UNDO), wrong)
        return self._fill(rng.choice(TRY_AGAIN if rng.random() < 0.3 else CORRECTIONS), wrong)


def right_action(game: SimulatedGame) -> tuple[frozenset[str], frozenset[str]]:
    """A perfect listener's action (deselected, selected images): undo every wrong selection, else select
    the target asked for."""
    wrong = game.selection - game.targets
    return (frozenset(wrong), frozenset()) if wrong else (frozenset(), frozenset({game.asked}))


def human_action(game: SimulatedGame, rng: random.Random, skill: float) -> tuple[frozenset[str], frozenset[str]]:
    """A person in the listener's seat: after a wrong selection, undoes it (with probability ``skill``);
    otherwise selects the target asked for with probability ``skill``, another image otherwise."""
    wrong = game.selection - game.targets
    if wrong and game.truths and game.truths[-1] == -1 and rng.random() < skill:
        return frozenset(wrong), frozenset()
    free = sorted(set(game.context) - game.selection)
    if game.asked in free and rng.random() < skill:
        return frozenset(), frozenset({game.asked})
    return frozenset(), frozenset({rng.choice(free)})


GAME_NUMBER = r"-(\d{6})$"  # the end of a simulated game's id: its number, the same game for every policy


def deployed_game_id(round_: int, policy: str, seed: int, number: int) -> str:
    """The id of a policy's simulated game ``number`` of a round (game ``number`` shows every policy of the
    round the same tangrams and targets, and its speaker starts from the same draws)."""
    return f"sim-r{round_}-{policy}-{seed}-{number:06d}"


def interaction_row(game: SimulatedGame, game_id: str, policy: str, round_: int, clicks: list[list[str]],
                    probabilities: list[float | None]) -> dict:
    """A finished game in the public interaction layout, with the simulator's truth of each turn."""
    return {"game_id": game_id, "turn": len(game.chat), "end": "successful" if game.selection == game.targets
            else "unsuccessful", "speaker": "simulator", "len": len(game.chat), "context": game.context,
            "targets": sorted(game.targets), "chat": list(game.chat), "clicks": clicks,
            "prob_action": probabilities, "dataset_alias": "simulated-kilogram", "policy_name": policy,
            "date": f"round-{round_}", "round": round_, "truth": list(game.truths)}


def human_games(n: int, descriptions: dict[str, list[str]], settings: SpeakerSettings, *, seed: int,
                skill: float = 0.9) -> list[dict]:
    """``n`` human-human games (listener ``human``, p not logged), for D_0 and validation."""
    rows = []
    for i in range(n):
        rng = random.Random(f"human/{seed}/{i}")
        game = SimulatedGame.new(rng, descriptions, settings)
        clicks = []
        while not game.over:
            game.act(*human_action(game, rng, skill))
            clicks.append(sorted(game.selection))
        rows.append(interaction_row(game, f"sim-human-{seed}-{i:06d}", "human", 0, clicks, [None] * len(clicks)))
    return rows


def action_images(action: Action, context: list[str]) -> tuple[frozenset[str], frozenset[str]]:
    """An action in listener letters as (deselected, selected) images."""
    return frozenset(images_of(action.deselect, context)), frozenset(images_of(action.select, context))
