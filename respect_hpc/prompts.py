"""Prompts: the policy's chat context and the feedback decoder's questions.

Pure code. Every prompt text is a named, versioned template in a registry, so a
round manifest can pick one by name (``respect-binary@1``) and a decoded label
can record exactly which text produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

from respect_hpc.multiref import LETTERS


class PromptError(ValueError):
    """An unknown template name or a window that cannot be rendered."""


@dataclass(frozen=True)
class DecoderTemplate:
    """A feedback-decoder prompt: question, answer line, and its label words."""

    name: str
    version: int
    question: str
    answer_line: str
    labels: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def kind(self) -> str:
        return "ternary" if len(self.labels) == 3 else "binary"


_BINARY_QUESTION = (
    "Please carefully read the following conversation and answer: Is the very last "
    "utterance from the speaker a positive or negative feedback? Often negative "
    "feedbacks include corrections and keywords like no, not, undo, don't, with "
    "generally negative sentiment, while positive feedbacks often include good, "
    "yes, correct, okay, or simply move on to the next stage. Lean towards negative "
    "if it sounds neutral."
)
_TERNARY_QUESTION = (
    "Please carefully read the following conversation and answer: Is the very last "
    "utterance from the speaker a positive, neutral, or negative feedback? Often negative "
    "feedbacks include corrections and keywords like no, not, undo, don't, with "
    "generally negative sentiment, while positive feedbacks often include good, "
    "yes, correct, okay, or simply move on to the next stage."
)

DECODER_TEMPLATES: dict[str, DecoderTemplate] = {
    t.key: t
    for t in (
        DecoderTemplate(
            "respect-binary", 1, _BINARY_QUESTION,
            "Answer a single word, Positive, or Negative.", ("Positive", "Negative"),
        ),
        DecoderTemplate(
            "respect-ternary", 1, _TERNARY_QUESTION,
            "Answer a single word, Positive, Neutral or Negative.", ("Positive", "Neutral", "Negative"),
        ),
    )
}
DEFAULT_DECODER_TEMPLATE = {"binary": "respect-binary@1", "ternary": "respect-ternary@1"}

# Decoded label word -> feedback value stored in tables (-1 / 0 / 1).
LABEL_VALUES = {"Positive": 1, "Neutral": 0, "Negative": -1}


def decoder_template(key: str) -> DecoderTemplate:
    try:
        return DECODER_TEMPLATES[key]
    except KeyError:
        known = ", ".join(sorted(DECODER_TEMPLATES))
        raise PromptError(f"unknown decoder template {key!r}: expected one of {known}") from None


def decoder_prompt(template: DecoderTemplate, previous_action: str | None, utterance: str,
                   action: str, follow_up: str) -> str:
    """The decoder's question about ``action``, judged by ``follow_up``.

    The window is the last two action/utterance pairs: the previous action (absent
    on a game's first turn), the utterance it drew, the action in focus, and the
    follow-up utterance.
    """
    lines = [template.question, "(start of the conversation)"]
    if previous_action is not None:
        lines.append(f"Listener: {previous_action}")
    lines += [f"Speaker: {utterance}", f"Listener: {action}", f"Speaker: {follow_up}",
              "(end of the conversation)", template.answer_line]
    return "\n".join(lines)


@dataclass(frozen=True)
class PolicyTemplate:
    """How a game's turns are laid out as one chat for the policy."""

    name: str
    version: int
    intro: str
    none_selected: str
    selected: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


POLICY_TEMPLATES: dict[str, PolicyTemplate] = {
    t.key: t
    for t in (
        PolicyTemplate(
            "multiref-listener", 1,
            intro=("You are the listener in a reference game. The speaker describes some of "
                   "these images; answer each utterance by selecting or deselecting images "
                   "by their letters."),
            none_selected="none is selected",
            selected="{letters} currently selected",
        ),
    )
}
DEFAULT_POLICY_TEMPLATE = "multiref-listener@1"


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
    ``actions`` the listener's earlier actions (one fewer than utterances). Images
    appear as ``{"type": "image"}`` parts in listener order, tagged A, B, ...; the
    caller supplies the pixels in that order.
    """
    if len(selections_before) != len(utterances) or len(actions) != len(utterances) - 1:
        raise PromptError(
            f"policy context needs one selection per utterance and one action fewer: got "
            f"{len(utterances)} utterances, {len(selections_before)} selections, {len(actions)} actions")
    intro: list[dict] = [{"type": "text", "text": template.intro}]
    for letter in LETTERS[:n_images]:
        intro += [{"type": "text", "text": f" {letter}"}, {"type": "image"}]
    messages = [{"role": "system", "content": intro}]
    for i, utterance in enumerate(utterances):
        messages.append({"role": "system", "content": [
            {"type": "text", "text": selection_line(template, selections_before[i])}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": utterance}]})
        if i < len(actions):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": actions[i]}]})
    return messages
