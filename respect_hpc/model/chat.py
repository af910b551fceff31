"""Prompts rendered through a model's own chat template and tokenised as the model's processor does.

The texts a model sees depend on its template: IDEFICS2 writes ``Role: text<end_of_utterance>``
and reads typed content only (a plain string renders as nothing). Every prompt of the
project goes through :func:`render` here, so the decoder, the policy and ``respect-hpc
prompts`` show the model exactly the same text. Templates that read plain-string
content (most text-only chat models) get the text parts joined, detected once per tokenizer.
Token ids start with BOS when the tokenizer adds one (IDEFICS2's processor does), once.
"""

from __future__ import annotations

from dataclasses import dataclass

from respect_hpc.core.errors import RespectError
from respect_hpc.domain.prompts import DecoderTemplate, answer_message, decoder_question, decoder_window, figure_window

_PROBE = "respect-hpc probe 7qz"


class ChatError(RespectError, ValueError):
    """A template that cannot render a prompt the way the project needs it."""


def _reads_typed_content(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders typed content (answer remembered per template)."""
    template, known = getattr(tokenizer, "_respect_typed_content", (None, None))
    if template != tokenizer.chat_template:
        probe = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
        try:
            known = _PROBE in tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template that concatenates content as a string raises on a list
            known = False
        tokenizer._respect_typed_content = (tokenizer.chat_template, known)
    return known


def _as_strings(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")}
            for m in messages]


def render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    """``messages`` through the tokenizer's chat template, stripped (as the official code strips), except for
    the whitespace that ends the template's own generation prompt: ChatML's ``<|im_start|>assistant\n`` keeps
    its newline, after which the model writes its answer (IDEFICS2's ``Assistant:`` has none to keep)."""
    if not _reads_typed_content(tokenizer):
        messages = _as_strings(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if generation_prompt:
        body = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        if text.startswith(body) and text[len(body):].strip():
            return text.lstrip()
    return text.strip()


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts, with BOS where the tokenizer adds it and the template did not."""
    bos = tokenizer.bos_token
    special = [not (bos and t.startswith(bos)) for t in texts]
    if all(special) or not any(special):
        return tokenizer(texts, add_special_tokens=special[0] if texts else True)["input_ids"]
    return [tokenizer(t, add_special_tokens=s)["input_ids"] for t, s in zip(texts, special)]


def without_images(messages: list[dict]) -> list[dict]:
    """Messages without image parts (a text-only policy reads the letters alone)."""
    return [{"role": m["role"], "content": [p for p in m["content"] if p["type"] != "image"]} for m in messages]


def decoder_text(tokenizer, template: DecoderTemplate, previous_action: str | None, utterance: str, action: str,
                 follow_up: str) -> str:
    """The decoder's full prompt for one window, ending with the generation prompt."""
    window = decoder_window(template, previous_action, utterance, action, follow_up)
    if template.window_style == "figure":
        return render(tokenizer, decoder_question(template, figure_window(window)), generation_prompt=True)
    if not _reads_typed_content(tokenizer):
        window = _as_strings(window)
    rendered = tokenizer.apply_chat_template(window, tokenize=False, add_generation_prompt=False)
    return render(tokenizer, decoder_question(template, rendered), generation_prompt=True)


@dataclass(frozen=True)
class PolicyText:
    """A policy prompt (ending with the generation prompt) and the answer text the policy is trained on."""

    prompt: str
    target: str


def policy_text(tokenizer, messages: list[dict], action: str | None) -> PolicyText:
    """The policy's prompt for ``messages`` (:func:`prompts.policy_messages`) and ``action`` as its target.

    The target is what the full chat (with the answer) adds after the prompt: for IDEFICS2
    `` deselect B select J<end_of_utterance>``. A template whose full chat does not
    continue its generation prompt cannot mark the answer's tokens and is refused.
    """
    prompt = render(tokenizer, messages, generation_prompt=True)
    if action is None:
        return PolicyText(prompt, "")
    full = render(tokenizer, [*messages, answer_message(action)], generation_prompt=False)
    if not full.startswith(prompt):
        raise ChatError("the model's chat template does not continue its generation prompt with the answer "
                        f"(prompt ends {prompt[-40:]!r}, chat with the answer has {full[len(prompt) - 40:][:80]!r})")
    return PolicyText(prompt, full[len(prompt):])
