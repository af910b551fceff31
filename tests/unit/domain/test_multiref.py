"""MultiRef rules: action grammar, selections, success, letters <-> images."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from respect_hpc.domain.multiref import (
    LETTERS,
    Action,
    ActionError,
    apply_action,
    format_action,
    game_over,
    image_of,
    images_of,
    is_success,
    letter_of,
    letters_of,
    parse_action,
)


@pytest.mark.parametrize("text, canonical", [
    ("select F", "select F"),
    ("deselect J select A", "deselect J select A"),
    ("select C A", "select A C"),
    ("SELECT a".replace("a", "A"), "select A"),
    ("select B deselect J C", "deselect C J select B"),
    ("  Deselect   A  ", "deselect A"),
])
def test_canonical_form(text, canonical):
    assert format_action(parse_action(text)) == canonical


@pytest.mark.parametrize("text, message", [
    ("Select Z", "letter Z is outside the context A..J"),
    ("Deselect select", "'deselect' names no image"),
    ("Select", "'select' names no image"),
    ("", "empty action"),
    ("select A A", "letter A appears twice"),
    ("select A select B", "'select' appears twice"),
    ("Click A", "expected 'select' or 'deselect' first, got 'Click'"),
    ("select AB", "expected an image letter A..J, got 'AB'"),
    ("Select a", "expected an image letter A..J, got 'a'"),
    ("deselect A select A", "letters both deselected and selected: A"),
])
def test_malformed_actions(text, message):
    with pytest.raises(ActionError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_action(text)


def test_context_size_limits_letters():
    assert parse_action("select D", n_images=4) == Action(select=frozenset("D"))
    with pytest.raises(ActionError, match="outside the context A..D"):
        parse_action("select E", n_images=4)


letter_sets = st.sets(st.sampled_from("ABCDEFGHIJ"))


@given(letter_sets, letter_sets, st.randoms())
def test_format_of_parse_is_canonical_and_idempotent(deselect, select, rnd):
    select -= deselect
    if not deselect and not select:
        return
    # Build a messy but valid spelling: random clause order, letter order and keyword case.
    clauses = [("deselect", sorted(deselect)), ("select", sorted(select))]
    clauses = [(k, v) for k, v in clauses if v]
    rnd.shuffle(clauses)
    words = []
    for keyword, letters in clauses:
        rnd.shuffle(letters)
        words += [rnd.choice([keyword, keyword.upper(), keyword.capitalize()]), *letters]
    text = " ".join(words)
    canonical = format_action(parse_action(text))
    assert canonical == format_action(parse_action(canonical))
    assert parse_action(canonical) == Action(frozenset(deselect), frozenset(select))
    expected_order = ([f"deselect {' '.join(sorted(deselect))}"] if deselect else []) + (
        ["select " + " ".join(sorted(select))] if select else [])
    assert canonical == " ".join(expected_order)


def test_apply_action_and_success():
    selection = apply_action(frozenset(), parse_action("select A C"))
    assert selection == frozenset("AC")
    selection = apply_action(selection, parse_action("deselect C select D"))
    assert selection == frozenset("AD")
    assert is_success(selection, frozenset("DA"))
    assert not is_success(selection, frozenset("ADE"))
    with pytest.raises(ActionError, match="selects what is already selected: A"):
        apply_action(selection, parse_action("select A"))
    with pytest.raises(ActionError, match="deselects what is not selected: B"):
        apply_action(selection, parse_action("deselect B"))


def test_turn_limit():
    assert game_over(frozenset("AB"), frozenset("AB"), turns=1)
    assert not game_over(frozenset("A"), frozenset("AB"), turns=9)
    assert game_over(frozenset("A"), frozenset("AB"), turns=10)
    assert not game_over(frozenset("A"), frozenset("AB"), turns=10, max_turns=12)


def test_letters_and_images():
    context = ["x.png", "y.png", "z.png"]
    assert letter_of("z.png", context) == "C"
    assert image_of("B", context) == "y.png"
    assert letters_of(["z.png", "x.png"], context) == frozenset("AC")
    assert images_of(frozenset("CA"), context) == ["x.png", "z.png"]
    with pytest.raises(ActionError, match="image 'w.png' is not in the context"):
        letter_of("w.png", context)
    with pytest.raises(ActionError, match="letter 'D' is outside the context A..C"):
        image_of("D", context)


def _legal_actions(n_images: int, selected: frozenset[str]) -> set[str]:
    """Every legal action string of a state, letters in any order (a brute-force reading of the grammar)."""
    from itertools import permutations

    letters = LETTERS[:n_images]
    chosen, free = [x for x in letters if x in selected], [x for x in letters if x not in selected]
    deselects = [""] + [" ".join(p) for k in range(1, len(chosen) + 1) for p in permutations(chosen, k)]
    selects = [""] + [" ".join(p) for k in range(1, len(free) + 1) for p in permutations(free, k)]
    found = set()
    for d in deselects:
        for s in selects:
            if d or s:
                found.add(" ".join(part for part in (f"deselect {d}" if d else "", f"select {s}" if s else "")
                                   if part))
    return found


@given(st.integers(1, 4), st.data())
def test_action_prefix_accepts_exactly_the_prefixes_of_legal_actions(n_images, data):
    from respect_hpc.domain.multiref import action_prefix

    selected = frozenset(data.draw(st.sets(st.sampled_from(LETTERS[:n_images]))))
    legal = _legal_actions(n_images, selected)
    prefixes = {a[:i] for a in legal for i in range(len(a) + 1)}
    for text in prefixes:
        expected = "complete" if text in legal else "open"
        assert action_prefix(" " + text, n_images, selected) == expected, (text, selected)
    junk = data.draw(st.text(alphabet="adeAlsBcDt ", max_size=14))
    if junk.lstrip(" ") not in prefixes:
        assert action_prefix(junk, n_images, selected) is None, (junk, selected)


def _regex_actions(n_images: int) -> set[str]:
    """Every action the official regex allows (``RE_PATTERN``: deselect letters, then optionally select
    letters, or select letters) with no letter twice, whatever is selected."""
    from itertools import permutations

    letters = LETTERS[:n_images]
    found = set()
    for k in range(1, n_images + 1):
        for names in permutations(letters, k):
            found.add("select " + " ".join(names))
            for cut in range(1, k + 1):
                rest = f" select {' '.join(names[cut:])}" if cut < k else ""
                found.add("deselect " + " ".join(names[:cut]) + rest)
    return found


@given(st.integers(1, 4), st.data())
def test_the_state_agnostic_grammar_accepts_exactly_the_official_regex_prefixes(n_images, data):
    import re

    from respect_hpc.domain.multiref import action_prefix

    pattern = r'^(deselect\s[A-Z](?:\s[A-Z])*(?:\sselect\s[A-Z](?:\s[A-Z])*)?|select\s[A-Z](?:\s[A-Z])*)$'
    legal = _regex_actions(n_images)
    assert all(re.match(pattern, a) for a in legal)
    prefixes = {a[:i] for a in legal for i in range(len(a) + 1)}
    for text in prefixes:
        assert action_prefix(" " + text, n_images, None) == ("complete" if text in legal else "open"), text
    junk = data.draw(st.text(alphabet="adeAlsBcDt ", max_size=14))
    if junk.lstrip(" ") not in prefixes:
        assert action_prefix(junk, n_images, None) is None, junk


def test_the_mismatched_click_is_a_or_b_by_the_current_selection():
    from respect_hpc.domain.multiref import mismatched_click

    assert mismatched_click("select C", frozenset()) == "select A"
    assert mismatched_click("select C", frozenset({"A"})) == "deselect A"
    assert mismatched_click("select A", frozenset()) == "select B"  # exactly that click: the second image
    assert mismatched_click("deselect A", frozenset({"A", "B"})) == "deselect B"
    assert mismatched_click("deselect A select C", frozenset({"A"})) == "deselect A"  # not a single click
