"""Prompts: the policy's chat and the feedback decoder's questions, in the official ReSpect formats.

Pure code: messages are lists of ``{"role", "content"}`` dicts with typed content
(``[{"type": "text", "text": ...}, {"type": "image"}]``), the form multimodal chat
templates read; :mod:`respect_hpc.model.chat` renders them through a model's template.
Every format is a named, versioned template in a registry, so a round manifest
picks one by name (``respect-binary@2``) and a decoded label records exactly
which text produced it.

The defaults are the formats of the official implementation (OFFICIAL-RECIPE.md
(b) and (c)): the policy sees a system message of images and letters, then per
turn the selection before it, the utterance and its action (``select E``,
``deselect E select B``, ``nothing``); the decoder sees the last four messages of
the game without images or selection lines, rendered through the model's own
chat template with the roles renamed to Speaker and Listener, between a question
and an answer line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from respect_hpc.core.errors import RespectError
from respect_hpc.domain.multiref import LETTERS

NO_ACTION = "nothing"   # how an empty action (no click) is written in a prompt


class PromptError(RespectError, ValueError):
    """An unknown template name or a window that cannot be rendered."""


def text(value: str) -> list[dict]:
    return [{"type": "text", "text": value}]


def shown_action(action: str) -> str:
    """An action as prompts write it: the canonical text, or ``nothing`` for no click."""
    return action or NO_ACTION


@dataclass(frozen=True)
class DecoderTemplate:
    """A feedback-decoder prompt: question, answer line, label words, and how the window is written."""

    name: str
    version: int
    question: str
    answer_line: str
    labels: tuple[str, ...]
    # replacements applied to the window as the chat template rendered it (roles -> game roles)
    roles: tuple[tuple[str, str], ...] = (("User", "\tSpeaker"), ("Assistant", "\tListener"))
    window_messages: int = 4
    label_answers: tuple[str, ...] = field(default=())  # what the official decoder answers, for teaching
    # how the window is written: "chat", rendered by the model's chat template and the roles replaced (the
    # official code); "figure", plain "Listener: Deselect F select G" lines, as the paper's Figure 3 shows
    window_style: str = "chat"

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def kind(self) -> str:
        return "ternary" if len(self.labels) == 3 else "binary"


_HEAD = ("Please carefully read the following conversation and answer: Is the very last utterance from the "
         "speaker a {options} feedback? Often negative feedbacks include corrections and keywords like no, not, "
         "undo, don't, with generally negative sentiment, while positive feedbacks often include good, yes, "
         "correct, okay, or simply move on to the next stage. ")

DECODER_TEMPLATES: dict[str, DecoderTemplate] = {
    t.key: t
    for t in (
        DecoderTemplate(
            "respect-binary", 2, _HEAD.format(options="positive or negative") + "Lean towards negative if it "
            "sounds neutral.", "Answer a single word, Positive, or Negative.", ("Positive", "Negative"),
            label_answers=(" Positive.", " Negative.")),
        DecoderTemplate(
            "respect-ternary", 2, _HEAD.format(options="positive, neutral, or negative"),
            "Answer a single word, Positive, Neutral or Negative.", ("Positive", "Neutral", "Negative"),
            label_answers=(" Positive.", " Neutral", " Negative.")),
    )
}
DECODER_TEMPLATES |= {
    t.key: t
    for t in (DecoderTemplate(f"{official.name}-figure", 1, official.question, official.answer_line, official.labels,
                              roles=(), label_answers=official.label_answers, window_style="figure")
              for official in DECODER_TEMPLATES.values())
}
DEFAULT_DECODER_TEMPLATE = {"binary": "respect-binary@2", "ternary": "respect-ternary@2"}

# Decoded label word -> feedback value stored in tables (-1 / 0 / 1).
LABEL_VALUES = {"Positive": 1, "Neutral": 0, "Negative": -1}


def decoder_template(key: str) -> DecoderTemplate:
    try:
        return DECODER_TEMPLATES[key]
    except KeyError:
        known = ", ".join(sorted(DECODER_TEMPLATES))
        raise PromptError(f"unknown decoder template {key!r}: expected one of {known}") from None


def decoder_window(template: DecoderTemplate, previous_action: str | None, utterance: str, action: str,
                   follow_up: str) -> list[dict]:
    """The messages the decoder reads about ``action``: its last ``window_messages`` of the game so far.

    The game without images and selection lines is utterance, action, utterance,
    action, ..., then the follow-up as a user message; ``previous_action`` is None
    on a game's first turn (three messages then).
    """
    messages = [] if previous_action is None else [{"role": "assistant", "content": text(shown_action(previous_action))}]
    messages += [{"role": "user", "content": text(utterance)},
                 {"role": "assistant", "content": text(shown_action(action))},
                 {"role": "user", "content": text(follow_up)}]
    return messages[-template.window_messages:]


def figure_window(messages: list[dict]) -> str:
    """A window as the paper's Figure 3 writes it: one ``Speaker:`` or ``Listener:`` line a message, actions
    capitalised, no end-of-utterance tokens."""
    lines = []
    for message in messages:
        content = message["content"][0]["text"]
        if message["role"] == "assistant":
            lines.append(f"Listener: {content[:1].upper()}{content[1:]}\n")
        else:
            lines.append(f"Speaker: {content}\n")
    return "".join(lines)


def decoder_question(template: DecoderTemplate, rendered_window: str) -> list[dict]:
    """The decoder's one user message around the window as the model's chat template rendered it."""
    window = rendered_window
    for old, new in template.roles:
        window = window.replace(old, new)
    return [{"role": "user", "content": text(
        f"{template.question}\n(start of the conversation)\n{window}(end of the conversation)\n"
        f"{template.answer_line}")}]


@dataclass(frozen=True)
class PolicyTemplate:
    """How a game's turns are laid out as one chat for the policy."""

    name: str
    version: int
    none_selected: str
    selected: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


POLICY_TEMPLATES: dict[str, PolicyTemplate] = {
    t.key: t
    for t in (
        PolicyTemplate("respect-listener", 1, none_selected="none is selected", selected="{letters} currently selected"),
    )
}
DEFAULT_POLICY_TEMPLATE = "respect-listener@1"


def policy_template(key: str) -> PolicyTemplate:
    try:
        return POLICY_TEMPLATES[key]
    except KeyError:
        known = ", ".join(sorted(POLICY_TEMPLATES))
        raise PromptError(f"unknown policy template {key!r}: expected one of {known}") from None


def selection_line(template: PolicyTemplate, letters: frozenset[str] | list[str]) -> str:
    if not letters:
        return template.none_selected
    return template.selected.format(letters=" ".join(sorted(letters)))


def policy_messages(template: PolicyTemplate, n_images: int, utterances: list[str],
                    selections_before: list[frozenset[str]], actions: list[str]) -> list[dict]:
    """The chat a policy sees before its action on the last of ``utterances``.

    ``selections_before[i]`` is the selection (letters) before turn i and
    ``actions`` the listener's earlier actions (one fewer than utterances). The
    system message shows the images in listener order, each followed by its
    letter; the caller supplies the pixels in that order.
    """
    if len(selections_before) != len(utterances) or len(actions) != len(utterances) - 1:
        raise PromptError(
            f"policy context needs one selection per utterance and one action fewer: got "
            f"{len(utterances)} utterances, {len(selections_before)} selections, {len(actions)} actions")
    images: list[dict] = []
    for letter in LETTERS[:n_images]:
        images += [{"type": "image"}, {"type": "text", "text": letter}]
    messages = [{"role": "system", "content": images}]
    for i, utterance in enumerate(utterances):
        messages.append({"role": "system", "content": text(selection_line(template, selections_before[i]))})
        messages.append({"role": "user", "content": text(utterance)})
        if i < len(actions):
            messages.append({"role": "assistant", "content": text(shown_action(actions[i]))})
    return messages


def answer_message(action: str) -> dict:
    """The policy's answer as the last message of a training chat."""
    return {"role": "assistant", "content": text(shown_action(action))}
