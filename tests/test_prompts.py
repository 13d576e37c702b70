"""The A1111 prompt language: emphasis, editing, alternation, AND, extra-network tags.

Expected values marked "A1111 doctest" are the examples in A1111's `modules/prompt_parser.py`.
The scheduling cases were also checked against A1111's lark grammar run on random prompts:
they agree except where stray brackets at the top level make the grammar ambiguous (see
`test_stray_brackets_next_to_a_construct`).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm_core.prompts import (
    BREAK,
    extract_extra_networks,
    get_prompt_schedule,
    parse_attention,
    parse_prompt,
    split_and,
    text_at_step,
)

UP, DOWN = 1.1, 1 / 1.1

# ------------------------------------------------------------------------------------------
# Emphasis
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_attention_a1111_doctests(prompt, expected):
    assert parse_attention(prompt) == expected


def test_attention_weights_and_nesting():
    assert parse_attention("(a:1.3)") == [("a", 1.3)]
    assert parse_attention("(a: 1.5 )") == [("a", 1.5)]
    assert parse_attention("(a:-1)") == [("a", -1.0)]
    assert parse_attention("[a]") == [("a", DOWN)]
    assert parse_attention("((a))") == [("a", UP * UP)]
    assert parse_attention("[[a]]") == [("a", DOWN * DOWN)]
    assert parse_attention("((a:2))") == [("a", 2 * UP)]
    assert parse_attention("([a])") == [("a", DOWN * UP)]
    assert parse_attention("x ((a) b:0.5) y") == [
        ("x ", 1.0),
        ("a", UP * 0.5),
        (" b", 0.5),
        (" y", 1.0),
    ]


def test_attention_escapes_and_backslashes():
    assert parse_attention("\\(a\\) \\[b\\]") == [("(a) [b]", 1.0)]
    assert parse_attention("a\\\\b") == [("a\\b", 1.0)]
    # any other backslash is dropped, as A1111 does
    assert parse_attention("a\\b") == [("ab", 1.0)]
    assert parse_attention("(\\(x\\))") == [("(x)", 1.1)]


def test_attention_unbalanced_brackets_degrade_like_a1111():
    # unmatched closing brackets are literal text
    assert parse_attention("a) b]") == [("a) b]", 1.0)]
    assert parse_attention("a:1.2) b") == [("a:1.2) b", 1.0)]
    # open brackets apply to the rest of the prompt: round ones first, then square
    assert parse_attention("a (b [c") == [("a ", 1.0), ("b ", 1.1), ("c", 1.0 * UP * DOWN)]
    assert parse_attention("[a (b") == [("a ", DOWN), ("b", 1.0 * UP * DOWN)]
    assert parse_attention("(a:1.2") == [("a:1.2", 1.1)]
    assert parse_attention("((a) b") == [("a", UP * UP), (" b", UP)]


def test_attention_colons_that_are_not_weights():
    assert parse_attention("a: b, c:d") == [("a: b, c:d", 1.0)]
    assert parse_attention("(a:b)") == [("a:b", 1.1)]


def test_attention_invalid_weight_is_text_not_an_error():
    # A1111 raises ValueError on float("1.2.3"); we keep the text and close the bracket
    assert parse_attention("(a:1.2.3)") == [("a:1.2.3", 1.1)]
    assert parse_attention("(a:.)") == [("a:.", 1.1)]
    huge = "9" * 400  # float() gives inf
    assert parse_attention(f"(a:{huge})") == [(f"a:{huge}", 1.1)]


def test_attention_weights_saturate_instead_of_overflowing():
    text = "(" * 3 + "a:1" + "0" * 300 + ")" + ":1" + "0" * 300 + ")" + ":1" + "0" * 300 + ")"
    weights = [w for _, w in parse_attention(text)]
    assert all(math.isfinite(w) for w in weights)


def test_attention_empty_prompt():
    assert parse_attention("") == [("", 1.0)]
    assert parse_attention("()") == [("", 1.0)]


def test_break():
    assert BREAK == ("BREAK", -1.0)
    assert parse_attention("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_attention("a\nBREAK\nb") == [("a", 1.0), BREAK, ("b", 1.0)]
    # whole uppercase word only
    assert parse_attention("a break b") == [("a break b", 1.0)]
    assert parse_attention("BREAKING aBREAK") == [("BREAKING aBREAK", 1.0)]
    # A1111 leaves an empty fragment after a trailing BREAK
    assert parse_attention("a BREAK") == [("a", 1.0), BREAK, ("", 1.0)]
    assert parse_attention("a BREAK BREAK b") == [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]


def test_break_inside_brackets_stays_a_break():
    # A1111 multiplies the marker's weight here (-1.1), which turns it into the literal word
    assert parse_attention("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]
    assert parse_attention("[a BREAK b") == [("a", DOWN), BREAK, ("b", DOWN)]


def test_textual_inversion_names_are_left_alone():
    text = "photo of my-embedding_v2, easynegative, bad_prompt_version2"
    assert parse_attention(text) == [(text, 1.0)]
    assert get_prompt_schedule(text, 20) == [(20, text)]


# ------------------------------------------------------------------------------------------
# Prompt editing and alternation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
        ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
        ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ],
)
def test_schedule_a1111_doctests(prompt, expected):
    assert get_prompt_schedule(prompt, 10) == expected


def test_schedule_a1111_doctest_that_its_own_grammar_does_not_produce():
    # A1111's doctest claims [(5, 'a  c'), (10, 'a {b|d{ c')] ("not handling this right
    # now"), but its lark grammar rejects a "|" outside an alternation, so the prompt is used
    # literally; we do the same.
    assert get_prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


def test_schedule_hires_timeline_a1111_doctests():
    assert get_prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert get_prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert get_prompt_schedule("a [b:13] c", 10, hires_steps=10) == [(3, "a  c"), (10, "a b c")]


def test_editing_examples_from_the_wiki():
    assert get_prompt_schedule("a [fantasy:cyberpunk:16] landscape", 50) == [
        (16, "a fantasy landscape"),
        (50, "a cyberpunk landscape"),
    ]
    assert get_prompt_schedule("a [fantasy:cyberpunk:0.25] landscape", 40) == [
        (10, "a fantasy landscape"),
        (40, "a cyberpunk landscape"),
    ]
    # 0.25 * 50 = 12.5 is truncated, as A1111's int() does
    assert get_prompt_schedule("[fantasy:cyberpunk:0.25]", 50) == [
        (12, "fantasy"),
        (50, "cyberpunk"),
    ]
    assert get_prompt_schedule("a [mountain:lake:10] [:tree:0.5][ sky::0.75]", 20) == [
        (10, "a mountain  sky"),
        (15, "a lake tree sky"),
        (20, "a lake tree"),
    ]


def test_a1111_long_example_comment():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
    )
    head = "fantasy landscape with a"
    assert get_prompt_schedule(prompt, 100) == [
        (25, f"{head} mountain and an oak in foreground shoddy"),
        (50, f"{head} lake and an oak in foreground in background shoddy"),
        (60, f"{head} lake and an oak in foreground in background masterful"),
        (75, f"{head} lake and an oak in background masterful"),
        (100, f"{head} lake and a christmas tree in background masterful"),
    ]


def test_when_integer_is_a_step_and_decimal_is_a_fraction():
    assert get_prompt_schedule("[a:b:1]", 20) == [(1, "a"), (20, "b")]
    # "1.0" is a fraction: the whole base pass, so the switch never happens
    assert get_prompt_schedule("[a:b:1.0]", 20) == [(20, "a")]
    assert get_prompt_schedule("[a:b:5.]", 20) == [(20, "a")]
    assert get_prompt_schedule("[a:b:0]", 20) == [(20, "b")]
    assert get_prompt_schedule("[a:b:-3]", 20) == [(20, "b")]
    assert get_prompt_schedule("[a:b:100]", 20) == [(20, "a")]
    assert get_prompt_schedule("[a:b:1e1]", 20) == [(10, "a"), (20, "b")]
    assert get_prompt_schedule("[a:b:1e999]", 20) == [(20, "a")]
    assert get_prompt_schedule("[a:b:-1e999]", 20) == [(20, "b")]


def test_old_scheduling_treats_values_below_one_as_fractions():
    assert get_prompt_schedule("[a:b:0.5]", 20, use_old_scheduling=True) == [(10, "a"), (20, "b")]
    assert get_prompt_schedule("[a:b:1.0]", 20, use_old_scheduling=True) == [(1, "a"), (20, "b")]
    assert get_prompt_schedule("[a:b:3.0]", 20, use_old_scheduling=True) == [(3, "a"), (20, "b")]


def test_alternation_and_nesting():
    assert get_prompt_schedule("[cow|horse] in a field", 4) == [
        (1, "cow in a field"),
        (2, "horse in a field"),
        (3, "cow in a field"),
        (4, "horse in a field"),
    ]
    assert get_prompt_schedule("[a|b|c]", 5) == [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]
    assert get_prompt_schedule("[[a|b]:c:2]", 4) == [(1, "a"), (2, "b"), (3, "c"), (4, "c")]
    assert get_prompt_schedule("[x:[a|b]:2]", 4) == [(1, "x"), (2, "x"), (3, "a"), (4, "b")]
    assert get_prompt_schedule("[(a:1.2)|[b]]", 2) == [(1, "(a:1.2)"), (2, "[b]")]


def test_emphasis_brackets_are_kept_for_the_attention_parser():
    assert get_prompt_schedule("(a:1.2) [b] ((c))", 10) == [(10, "(a:1.2) [b] ((c))")]
    assert get_prompt_schedule("[(a:1.2):b:5]", 10) == [(5, "(a:1.2)"), (10, "b")]


def test_prompts_the_grammar_rejects_are_used_literally():
    assert get_prompt_schedule("a|b", 10) == [(10, "a|b")]
    assert get_prompt_schedule("[a:b:3] x|y", 10) == [(10, "[a:b:3] x|y")]
    assert get_prompt_schedule("trailing \\", 10) == [(10, "trailing \\")]
    # non-number "when": not an edit, the brackets are plain emphasis text
    assert get_prompt_schedule("[a:b:c]", 10) == [(10, "[a:b:c]")]
    # escaped brackets are text
    assert get_prompt_schedule("\\[a:b:3\\]", 10) == [(10, "\\[a:b:3\\]")]


def test_stray_brackets_next_to_a_construct():
    # A1111's lark grammar is ambiguous here and its choice looks arbitrary (it keeps
    # "[d:.5][" as an edit but "[d:.5][:" literal); we always apply the construct.
    assert get_prompt_schedule("[d:.5][", 10) == [(5, "["), (10, "d[")]
    assert get_prompt_schedule("[d:.5][:", 10) == [(5, "[:"), (10, "d[:")]


def test_deep_nesting_does_not_raise():
    deep = "[" * 5000 + "a" + "]" * 5000
    assert get_prompt_schedule(deep, 10) == [(10, deep)]
    assert parse_attention(deep)[0][0] == "a"


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        get_prompt_schedule("a", 0)
    with pytest.raises(ValueError, match="hires_steps"):
        get_prompt_schedule("a", 10, hires_steps=0)


def test_text_at_step_uses_a1111_selection():
    schedule = [(3, "a"), (10, "b")]
    assert [text_at_step(schedule, s) for s in range(12)] == ["a"] * 4 + ["b"] * 8


# ------------------------------------------------------------------------------------------
# AND
# ------------------------------------------------------------------------------------------


def test_split_and():
    assert split_and("a cat") == [("a cat", 1.0)]
    assert split_and("a cat AND a dog :0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert split_and("a:1.2 AND b : -0.3 AND c: 2.") == [("a", 1.2), (" b", -0.3), (" c", 2.0)]
    assert split_and("a AND a") == [("a", 1.0), (" a", 1.0)]
    assert split_and("android and sandy") == [("android and sandy", 1.0)]
    assert split_and("a AND") == [("a", 1.0), ("", 1.0)]
    assert split_and("") == [("", 1.0)]
    # a colon that is not a trailing weight stays in the text
    assert split_and("time: 12:30 pm") == [("time: 12:30 pm", 1.0)]
    assert split_and("a:1:2") == [("a:1", 2.0)]
    assert split_and("multi\nline : 0.5  ") == [("multi\nline", 0.5)]


def test_split_and_non_finite_weight_stays_text():
    huge = "9" * 400
    assert split_and(f"a :{huge}") == [(f"a :{huge}", 1.0)]


# ------------------------------------------------------------------------------------------
# Extra networks
# ------------------------------------------------------------------------------------------


def test_lora_tags():
    text, tags = extract_extra_networks("a <lora:add_detail:0.8> cat <lora:style:1:0.5>")
    assert text == "a  cat "
    assert [(t.kind, t.name, t.te_weight, t.unet_weight) for t in tags] == [
        ("lora", "add_detail", 0.8, 0.8),
        ("lora", "style", 1.0, 0.5),
    ]
    assert tags[0].text == "<lora:add_detail:0.8>"
    assert all(t.error is None for t in tags)


def test_lora_tag_forms():
    def one(tag):
        _, tags = extract_extra_networks(tag)
        assert len(tags) == 1
        return tags[0]

    assert one("<lora:x>").te_weight == 1.0 and one("<lora:x>").unet_weight == 1.0
    tag = one("<lora:x:1:unet=0.5>")
    assert (tag.te_weight, tag.unet_weight, tag.named) == (1.0, 0.5, {"unet": "0.5"})
    tag = one("<lora:x:te=0.3>")
    assert (tag.te_weight, tag.unet_weight) == (0.3, 0.3)
    tag = one("<lora:x:0.9:0.4:8>")
    assert (tag.te_weight, tag.unet_weight, tag.dyn_dim) == (0.9, 0.4, 8)
    assert one("<lora:x:1:dyn=16>").dyn_dim == 16
    tag = one("<lyco:my_lyco:0.7>")
    assert (tag.kind, tag.name, tag.te_weight) == ("lyco", "my_lyco", 0.7)
    tag = one("<hypernet:anime:0.6>")
    assert (tag.kind, tag.name, tag.te_weight, tag.unet_weight) == ("hypernet", "anime", 0.6, 0.6)
    tag = one("<ext:thing:a:b:k=v>")
    assert (tag.kind, tag.name, tag.args, tag.named) == ("ext", "thing", ("a", "b"), {"k": "v"})
    assert one("<lora:name with spaces.v2:0.5>").name == "name with spaces.v2"


def test_bad_lora_weights_are_reported_not_raised():
    _, (tag,) = extract_extra_networks("<lora:x:abc>")
    assert tag.te_weight == 1.0 and "abc" in tag.error
    _, (tag,) = extract_extra_networks("<lora:x:inf>")
    assert tag.te_weight == 1.0 and tag.error
    _, (tag,) = extract_extra_networks("<lora:unet=1>")
    assert tag.name == "" and "no network name" in tag.error


def test_things_that_are_not_tags_stay():
    for text in ["a <b> c", "<:x>", "< lora:x:1>", "a <lora:> b", "1 < 2 > 0"]:
        assert extract_extra_networks(text) == (text, [])


# ------------------------------------------------------------------------------------------
# parse_prompt
# ------------------------------------------------------------------------------------------


def test_parse_prompt_puts_it_together():
    parsed = parse_prompt(
        "a [cat:dog:0.5] <lora:fur:0.7> AND (sunset:1.2) <hypernet:h> :0.4", steps=20
    )
    assert parsed.text == "a [cat:dog:0.5]  AND (sunset:1.2)  :0.4"
    assert [(t.kind, t.name, t.te_weight) for t in parsed.extra_networks] == [
        ("lora", "fur", 0.7),
        ("hypernet", "h", 1.0),
    ]
    first, second = parsed.subprompts
    assert (first.text, first.weight) == ("a [cat:dog:0.5]", 1.0)
    assert first.schedule == ((10, "a cat"), (20, "a dog"))
    assert (second.text, second.weight, second.schedule) == (
        " (sunset:1.2)",
        0.4,
        ((20, " (sunset:1.2)"),),
    )
    assert parsed.texts_at(0) == [("a cat", 1.0), (" (sunset:1.2)", 0.4)]
    assert parsed.texts_at(15) == [("a dog", 1.0), (" (sunset:1.2)", 0.4)]


def test_parsed_prompt_is_hashable():
    assert hash(parse_prompt("a <lora:x:1:unet=0.5>", steps=5)) is not None


def test_parse_prompt_empty():
    parsed = parse_prompt("", steps=20)
    assert parsed.extra_networks == ()
    assert [(s.text, s.weight, s.schedule) for s in parsed.subprompts] == [("", 1.0, ((20, ""),))]


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------

_SPECIAL = list("()[]{}<>:|\\,. -=\n\t0123456789") + ["AND", "BREAK", "lora", "e5", "1.5"]
prompt_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(_SPECIAL) | st.text(max_size=3), max_size=40).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(text=prompt_text, steps=st.integers(min_value=1, max_value=30))
def test_parsers_never_raise_and_weights_are_finite(text, steps):
    fragments = parse_attention(text)
    assert fragments and all(isinstance(t, str) and math.isfinite(w) for t, w in fragments)

    schedule = get_prompt_schedule(text, steps)
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1

    for _, weight in split_and(text):
        assert math.isfinite(weight)

    _, tags = extract_extra_networks(text)
    for tag in tags:
        assert math.isfinite(tag.te_weight) and math.isfinite(tag.unet_weight)

    parsed = parse_prompt(text, steps)
    assert len(parsed.subprompts) >= 1
    for sub in parsed.subprompts:
        assert math.isfinite(sub.weight)
        assert sub.schedule[-1][0] == steps


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_characters="()[]\\:|<>")))
def test_plain_text_passes_through(text):
    assert get_prompt_schedule(text, 7) == [(7, text)]
    if "BREAK" not in text:
        assert parse_attention(text) == [(text, 1.0)]
