"""Prompts: exact decoder texts (RESPECT.md) and the policy's chat context."""

import pytest

from respect_hpc.prompts import (PromptError, decoder_prompt, decoder_template, policy_messages, policy_template,
                                 selection_line)

BINARY_EXAMPLE = """\
Please carefully read the following conversation and answer: Is the very last utterance from the speaker a \
positive or negative feedback? Often negative feedbacks include corrections and keywords like no, not, undo, \
don't, with generally negative sentiment, while positive feedbacks often include good, yes, correct, okay, or \
simply move on to the next stage. Lean towards negative if it sounds neutral.
(start of the conversation)
Listener: Deselect F select G
Speaker: yes, pick the thin person with a triangle head
Listener: Select A
Speaker: yes, pick the house with chimney
(end of the conversation)
Answer a single word, Positive, or Negative."""

TERNARY_EXAMPLE = """\
Please carefully read the following conversation and answer: Is the very last utterance from the speaker a \
positive, neutral, or negative feedback? Often negative feedbacks include corrections and keywords like no, not, \
undo, don't, with generally negative sentiment, while positive feedbacks often include good, yes, correct, okay, \
or simply move on to the next stage.
(start of the conversation)
Speaker: the bird
Listener: Select C
Speaker: no, the other one
(end of the conversation)
Answer a single word, Positive, Neutral or Negative."""


def test_binary_prompt_is_the_papers():
    template = decoder_template("respect-binary@2")
    text = decoder_prompt(template, "Deselect F select G", "yes, pick the thin person with a triangle head",
                          "Select A", "yes, pick the house with chimney")
    assert text == BINARY_EXAMPLE
    assert template.labels == ("Positive", "Negative") and template.kind == "binary"


def test_ternary_prompt_on_a_first_turn_has_no_previous_action():
    template = decoder_template("respect-ternary@2")
    assert decoder_prompt(template, None, "the bird", "Select C", "no, the other one") == TERNARY_EXAMPLE
    assert template.labels == ("Positive", "Neutral", "Negative") and template.kind == "ternary"


def test_unknown_template_names_the_known_ones():
    with pytest.raises(PromptError, match=r"unknown decoder template 'respect-binary@9': expected one of "
                                          r"respect-binary@2, respect-ternary@2"):
        decoder_template("respect-binary@9")


def test_policy_context_of_a_third_turn():
    template = policy_template("respect-listener@1")
    messages = policy_messages(template, 3, ["the bird", "no, the cat", "yes, and the dog"],
                               [frozenset(), frozenset("A"), frozenset("B")], ["Select A", "Deselect A select B"])
    intro = messages[0]
    assert intro["role"] == "system"
    assert [p for p in intro["content"] if p["type"] == "text"][1:] == [
        {"type": "text", "text": " A"}, {"type": "text", "text": " B"}, {"type": "text", "text": " C"}]
    assert sum(p["type"] == "image" for p in intro["content"]) == 3
    flat = [(m["role"], m["content"][0]["text"]) for m in messages[1:]]
    assert flat == [
        ("system", "none is selected"), ("user", "the bird"), ("assistant", "Select A"),
        ("system", "A currently selected"), ("user", "no, the cat"), ("assistant", "Deselect A select B"),
        ("system", "B currently selected"), ("user", "yes, and the dog"),
    ]
    assert selection_line(template, ["G", "F"]) == "F G currently selected"


def test_policy_context_refuses_mismatched_turns():
    with pytest.raises(PromptError, match="one selection per utterance and one action fewer"):
        policy_messages(policy_template("respect-listener@1"), 3, ["a", "b"], [frozenset()], [])
