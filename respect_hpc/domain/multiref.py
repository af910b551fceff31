"""MultiRef game rules: the listener's action grammar, selections, success.

Pure code, no I/O. An action selects and/or deselects images named by the
listener's letters (A, B, ... in the listener's own image order). Its canonical
text is the one the official ReSpect policy reads and writes: lower-case verbs,
deselections first, letters sorted (``deselect J select A``, ``select A C``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from respect_hpc.core.errors import RespectError

LETTERS = string.ascii_uppercase
DEFAULT_MAX_TURNS = 10


class ActionError(RespectError, ValueError):
    """A malformed action string or an action that does not fit the game state."""


@dataclass(frozen=True)
class Action:
    """What the listener clicks in one turn, as sets of letters."""

    deselect: frozenset[str] = frozenset()
    select: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        both = self.deselect & self.select
        if both:
            raise ActionError(f"letters both deselected and selected: {' '.join(sorted(both))}")

    @property
    def is_empty(self) -> bool:
        return not self.deselect and not self.select

    @property
    def clicks(self) -> int:
        return len(self.deselect) + len(self.select)


def _letters_of(n_images: int) -> str:
    if not 1 <= n_images <= len(LETTERS):
        raise ActionError(f"a game has 1 to {len(LETTERS)} images, got {n_images}")
    return LETTERS[:n_images]


def parse_action(text: str, n_images: int = 10) -> Action:
    """Parse an action string; keywords are case-insensitive, letters upper case.

    Accepts either clause order and unsorted letters (``select C A deselect B``)
    and refuses anything else with an :class:`ActionError` saying what is wrong.
    """
    valid = _letters_of(n_images)
    tokens = text.split()
    if not tokens:
        raise ActionError("empty action: expected 'select X ...' or 'deselect X ...'")
    clauses: dict[str, list[str]] = {}
    current: str | None = None
    for token in tokens:
        keyword = token.lower()
        if keyword in ("select", "deselect"):
            if keyword in clauses:
                raise ActionError(f"{text!r}: '{keyword}' appears twice")
            if current is not None and not clauses[current]:
                raise ActionError(f"{text!r}: '{current}' names no image")
            current = keyword
            clauses[keyword] = []
        elif current is None:
            raise ActionError(f"{text!r}: expected 'select' or 'deselect' first, got {token!r}")
        elif len(token) == 1 and token in LETTERS:
            if token not in valid:
                raise ActionError(f"{text!r}: letter {token} is outside the context A..{valid[-1]}")
            if token in clauses[current]:
                raise ActionError(f"{text!r}: letter {token} appears twice")
            clauses[current].append(token)
        else:
            raise ActionError(f"{text!r}: expected an image letter A..{valid[-1]}, got {token!r}")
    if current is not None and not clauses[current]:
        raise ActionError(f"{text!r}: '{current}' names no image")
    return Action(frozenset(clauses.get("deselect", ())), frozenset(clauses.get("select", ())))


def format_action(action: Action) -> str:
    """The canonical text of an action; the empty action (no click) is ''."""
    deselect = " ".join(sorted(action.deselect))
    select = " ".join(sorted(action.select))
    if deselect and select:
        return f"deselect {deselect} select {select}"
    if deselect:
        return f"deselect {deselect}"
    if select:
        return f"select {select}"
    return ""


def action_prefix(text: str, n_images: int, selected: frozenset[str] | None) -> str | None:
    """How far ``text`` (leading spaces ignored) is into a legal action, by the constrained-decoding grammar:
    None when no legal action starts with it, "complete" when it is one (it may still go on), else "open".

    Legal: ``deselect`` and letters, then ``select`` and letters, either clause optional but not both; one
    space between words, no letter twice, letters among the game's images. With ``selected`` (the letters
    selected before the turn: state-aware) ``deselect`` takes only selected letters and ``select`` only the
    others; with None any letter goes in either clause, as the official regex (``RE_PATTERN``) ignores the state.
    """
    letters = _letters_of(n_images)
    *words, last = text.lstrip(" ").split(" ")
    clause, names, used = None, 0, set()

    def fits(letter: str) -> bool:
        return selected is None or (letter in selected) == (clause == "deselect")

    def candidates() -> list[str]:
        free = [x for x in letters if x not in used and fits(x)]
        if clause is None:
            return [k for k, clause_letters in (("deselect", selected), ("select", set(letters) - (selected or set())))
                    if selected is None or clause_letters]
        later = [x for x in letters if x not in used and (selected is None or x not in selected)]
        return (["select"] * bool(names and later) if clause == "deselect" else []) + free

    for word in words:
        if word not in candidates():
            return None
        if word in ("deselect", "select"):
            clause, names = word, 0
        else:
            used.add(word)
            names += 1
    options = candidates()
    if last in options and last not in ("deselect", "select"):
        return "complete"
    return "open" if any(option.startswith(last) for option in options) else None


def mismatched_click(action: str, selected: frozenset[str]) -> str:
    """The single click KTO's reference point is measured on: the first image (letter A), or the second when
    the action was exactly that click; deselect when the image is selected, else select."""
    for letter in "AB":
        click = f"{'deselect' if letter in selected else 'select'} {letter}"
        if click != action:
            return click
    raise AssertionError("unreachable: two different clicks cannot both equal one action")


def apply_action(selection: frozenset[str], action: Action) -> frozenset[str]:
    """The selection after an action; refuses clicks that change nothing."""
    already = action.select & selection
    if already:
        raise ActionError(f"selects what is already selected: {' '.join(sorted(already))}")
    missing = action.deselect - selection
    if missing:
        raise ActionError(f"deselects what is not selected: {' '.join(sorted(missing))}")
    return (selection - action.deselect) | action.select


def is_success(selection: frozenset[str], targets: frozenset[str]) -> bool:
    """A game is won when exactly the targets are selected."""
    return selection == targets


def game_over(selection: frozenset[str], targets: frozenset[str], turns: int, max_turns: int = DEFAULT_MAX_TURNS) -> bool:
    """A game ends on success or once it has used its turns."""
    return is_success(selection, targets) or turns >= max_turns


def letter_of(image: str, context: list[str]) -> str:
    """The listener's letter for an image, given the listener's image order."""
    try:
        return LETTERS[context.index(image)]
    except ValueError:
        raise ActionError(f"image {image!r} is not in the context") from None


def image_of(letter: str, context: list[str]) -> str:
    """The image behind a listener letter, given the listener's image order."""
    index = LETTERS.find(letter)
    if len(letter) != 1 or not 0 <= index < len(context):
        raise ActionError(f"letter {letter!r} is outside the context A..{LETTERS[len(context) - 1]}")
    return context[index]


def letters_of(images: list[str] | frozenset[str], context: list[str]) -> frozenset[str]:
    return frozenset(letter_of(image, context) for image in images)


def images_of(letters: frozenset[str], context: list[str]) -> list[str]:
    """Images for letters, in listener order."""
    return [image_of(letter, context) for letter in sorted(letters)]
