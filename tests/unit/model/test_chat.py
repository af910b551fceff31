"""Prompts in the official formats: OFFICIAL-RECIPE.md's rendered examples, character for character.

The texts are rendered through IDEFICS2-8B's real tokenizer and chat template (rebuilt
offline, :func:`replica.write_interface`), and through ``respect-hpc prompts`` itself.
"""

import json
import subprocess
import sys

import pytest

from respect_hpc.domain.prompts import PromptError, decoder_template, policy_messages, policy_template, selection_line
from respect_hpc.model.chat import ChatError, decoder_text, policy_text, render

TAB = "\t"
POLICY_EXAMPLE = """\
System:<image>A<image>B<image>C<image>D<image>E<image>F<image>G<image>H<image>I<image>J<end_of_utterance>
System: none is selected<end_of_utterance>
User: snowflake<end_of_utterance>
Assistant: select E<end_of_utterance>
System: E currently selected<end_of_utterance>
User: no<end_of_utterance>
Assistant: deselect E select B<end_of_utterance>
System: B currently selected<end_of_utterance>
User: no. leaf<end_of_utterance>
Assistant:"""

BINARY_EXAMPLE = f"""\
User: Please carefully read the following conversation and answer: Is the very last utterance from the speaker a \
positive or negative feedback? Often negative feedbacks include corrections and keywords like no, not, undo, don't, \
with generally negative sentiment, while positive feedbacks often include good, yes, correct, okay, or simply move \
on to the next stage. Lean towards negative if it sounds neutral.
(start of the conversation)
{TAB}Listener: deselect E select B<end_of_utterance>
{TAB}Speaker: no. leaf<end_of_utterance>
{TAB}Listener: deselect B select J<end_of_utterance>
{TAB}Speaker: yes. dinosaur<end_of_utterance>
(end of the conversation)
Answer a single word, Positive, or Negative.<end_of_utterance>
Assistant:"""

TERNARY_EXAMPLE = (BINARY_EXAMPLE.replace("a positive or negative feedback?",
                                          "a positive, neutral, or negative feedback?")
                   .replace("next stage. Lean towards negative if it sounds neutral.\n", "next stage. \n")
                   .replace("Positive, or Negative.", "Positive, Neutral or Negative."))


@pytest.fixture(scope="module")
def tokenizer(idefics2_interface):
    from respect_hpc.config.schema import ModelSection
    from respect_hpc.model.loading import load_tokenizer

    return load_tokenizer(ModelSection(path=idefics2_interface))


def example_game(path):
    """Turn MXNyYqyjjCG37Z2Hr_2 of OFFICIAL-RECIPE.md, its game in the public turn layout as the official generator
    writes it (clicks: the images toggled in each turn so far)."""
    context = [f"page{i}-1.png" for i in range(10)]
    e, b, j = context[4], context[1], context[9]
    chats = ["snowflake", "no", "no. leaf", "yes. dinosaur"]
    before, selected, deselected = [[], [e], [b], [j]], [[e], [b], [j], []], [[], [e], [b], []]
    rows = [{"game_turn_id": f"MXNyYqyjjCG37Z2Hr_{t}", "game_id": "MXNyYqyjjCG37Z2Hr", "turn_id": t,
             "chats": chats[:t + 1], "clicks": [sorted(selected[k] + deselected[k]) for k in range(t + 1)],
             "currently_selected": before[t], "selected": selected[t], "deselected": deselected[t],
             "chat_feedback": chats[t + 1] if t < 3 else "", "prob_action": 0.5, "context": context,
             "targets": [j, context[0]], "end": 0, "policy_name": "sft", "round": 0} for t in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_respect_hpc_prompts_reproduces_the_official_examples(tmp_path):
    logs = example_game(tmp_path / "game.jsonl")
    out = subprocess.run([sys.executable, "-m", "respect_hpc.cli", "prompts", str(logs), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["game_turn_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert list(rows) == [f"MXNyYqyjjCG37Z2Hr_{t}" for t in range(4)]
    turn = rows["MXNyYqyjjCG37Z2Hr_2"]
    assert turn["policy"] == POLICY_EXAMPLE
    assert turn["policy_target"] == " deselect B select J<end_of_utterance>"
    assert turn["decoder_binary"] == BINARY_EXAMPLE
    assert turn["decoder_ternary"] == TERNARY_EXAMPLE
    last = rows["MXNyYqyjjCG37Z2Hr_3"]
    assert last["decoder_binary"] is None and last["decoder_ternary"] is None
    first = rows["MXNyYqyjjCG37Z2Hr_0"]["decoder_binary"]  # three messages on turn 0: no previous action
    assert f"(start of the conversation)\n{TAB}Speaker: snowflake<end_of_utterance>\n{TAB}Listener: select E" in first


def test_decoder_prompts_are_not_empty_under_idefics2s_template(tokenizer):
    """IDEFICS2's template renders plain-string content as nothing: every window would read the same."""
    template = decoder_template("respect-binary@2")
    one = decoder_text(tokenizer, template, None, "the bird", "select C", "yes, now the chair")
    two = decoder_text(tokenizer, template, None, "the bird", "select C", "no, the other one")
    assert one != two and "no, the other one" in two and template.question in one
    # what a plain-string message gives under this template: the bug the typed content avoids
    assert tokenizer.apply_chat_template([{"role": "user", "content": template.question}], tokenize=False,
                                         add_generation_prompt=True) == "User: <end_of_utterance>\nAssistant:"


def test_the_figure_decoder_template_writes_the_window_as_the_papers_figure_3(tokenizer):
    """RESPECT.md's binary example: plain Listener/Speaker lines, actions capitalised, no tabs or end of
    utterance inside the window; the question and answer line the official ones."""
    template = decoder_template("respect-binary-figure@1")
    got = decoder_text(tokenizer, template, "deselect F select G", "yes, pick the thin person with a triangle head",
                       "select A", "yes, pick the house with chimney")
    official = decoder_template("respect-binary@2")
    window = ("(start of the conversation)\nListener: Deselect F select G\n"
              "Speaker: yes, pick the thin person with a triangle head\nListener: Select A\n"
              "Speaker: yes, pick the house with chimney\n(end of the conversation)\n")
    assert got == f"User: {official.question}\n{window}{official.answer_line}<end_of_utterance>\nAssistant:"
    first = decoder_text(tokenizer, template, None, "the bird", "select C", "no, the other one")
    assert "(start of the conversation)\nSpeaker: the bird\nListener: Select C\nSpeaker: no, the other one\n(end" \
        in first


def test_templates_that_read_plain_strings_get_strings(tokenizer):
    import copy

    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] + '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    text = decoder_text(chatml, decoder_template("respect-ternary@2"), "select A", "the bird", "select C", "yes")
    assert text.startswith("<|user|>Please carefully read") and text.endswith("<|assistant|>")
    assert "<|assistant|>select C\n<|user|>yes\n(end of the conversation)" in text
    messages = policy_messages(policy_template("respect-listener@1"), 2, ["the bird"], [frozenset()], [])
    assert policy_text(chatml, messages, "select B").target == "select B"


def test_a_template_that_does_not_continue_its_prompt_is_refused(tokenizer):
    import copy

    odd = copy.deepcopy(tokenizer)
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'][0]['text'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}ANSWER NOW:{% endif %}")
    messages = policy_messages(policy_template("respect-listener@1"), 2, ["the bird"], [frozenset()], [])
    assert render(odd, messages, generation_prompt=True).endswith("ANSWER NOW:")
    with pytest.raises(ChatError, match="does not continue its generation prompt"):
        policy_text(odd, messages, "select B")


def test_unknown_template_names_the_known_ones():
    with pytest.raises(PromptError, match=r"unknown decoder template 'respect-binary@9': expected one of "
                                          r"respect-binary-figure@1, respect-binary@2, "
                                          r"respect-ternary-figure@1, respect-ternary@2"):
        decoder_template("respect-binary@9")


def test_policy_messages_of_a_third_turn():
    template = policy_template("respect-listener@1")
    messages = policy_messages(template, 3, ["the bird", "no, the cat", "yes, and the dog"],
                               [frozenset(), frozenset("A"), frozenset("B")], ["select A", ""])
    assert messages[0] == {"role": "system", "content": [
        {"type": "image"}, {"type": "text", "text": "A"}, {"type": "image"}, {"type": "text", "text": "B"},
        {"type": "image"}, {"type": "text", "text": "C"}]}
    flat = [(m["role"], m["content"][0]["text"]) for m in messages[1:]]
    assert flat == [
        ("system", "none is selected"), ("user", "the bird"), ("assistant", "select A"),
        ("system", "A currently selected"), ("user", "no, the cat"), ("assistant", "nothing"),
        ("system", "B currently selected"), ("user", "yes, and the dog"),
    ]
    assert selection_line(template, ["G", "F"]) == "F G currently selected"


def test_policy_context_refuses_mismatched_turns():
    with pytest.raises(PromptError, match="one selection per utterance and one action fewer"):
        policy_messages(policy_template("respect-listener@1"), 3, ["a", "b"], [frozenset()], [])
