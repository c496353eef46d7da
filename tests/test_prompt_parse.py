"""AUTOMATIC1111 1.10 prompt language: emphasis, BREAK, prompt editing, alternation, AND, extra networks.

Expected values are webui's documented examples (the doctests of its prompt_parser.py) and outputs
recorded from webui 1.10's own parser (lark 1.1.2, as webui pins) for harder inputs. webui's
parser resolves a few ambiguous inputs (an edit group followed at the top level by a stray `:` or
`]`, e.g. `[:1]:`) differently from run to run, because lark orders equal-ranked derivations by
Python's randomised string hashes; those inputs are left out, and we always take the edit.
"""

from __future__ import annotations

import time

import pytest

from sdgen.prompting import (
    LoraReference,
    extract_extra_networks,
    extract_loras,
    parse_lora_argument,
    parse_prompt_attention,
    prompt_at_step,
    prompt_schedule,
    split_composable,
)
from sdgen.prompting.parse import EXACT_WORK

# Emphasis ---------------------------------------------------------------------------------------

ATTENTION_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("(a: 1.3 )", [("a", 1.3)]),
    ("a) b] c:", [("a) b] c:", 1.0)]),
    ("(a:1.2)x:0.5)", [("a", 1.2), ("x:0.5)", 1.0)]),
    ("a\\b\\\\c", [("ab\\c", 1.0)]),  # a backslash escaping nothing is dropped
    ("cat BREAK dog", [("cat", 1.0), ("BREAK", -1.0), ("dog", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("(cat BREAK dog)", [("cat", 1.1), ("BREAK", -1.1), ("dog", 1.1)]),  # then an ordinary word, as in webui
    ("[(a:2) b]", [("a", 2 / 1.1), (" b", 1 / 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # webui raises here; the bad weight stays text
]


@pytest.mark.parametrize("text, expected", ATTENTION_CASES)
def test_parse_prompt_attention_as_webui(text, expected):
    assert parse_prompt_attention(text) == expected


def test_attention_rejects_non_strings():
    with pytest.raises(ValueError, match="string"):
        parse_prompt_attention(None)


def test_hostile_prompts_parse_in_bounded_time():
    for text in ("x" * 1_000_000, "(" * 10_000 + "a" + ")" * 10_000, "(" * 10_000 + "a", "(a" * 300_000,
                 "[a" * 300_000, "(a)" * 300_000):
        start = time.perf_counter()
        pieces = parse_prompt_attention(text)
        assert time.perf_counter() - start < 20, text[:10]
        assert "".join(p for p, _ in pieces).count("a") == text.count("a")
    assert parse_prompt_attention("(" * 10_000 + "a" + ")" * 10_000)[0][1] == float("inf")  # 1.1 ** 10000


def test_linear_time_weights_agree_with_the_exact_order():
    # Past EXACT_WORK weight updates the log-space path is used; both agree up to rounding.
    count = int(EXACT_WORK ** 0.5) + 100
    fast = parse_prompt_attention("".join(f"(a{i} " for i in range(count)) + "(z:-0.5)")
    exact = parse_prompt_attention("".join(f"(a{i} " for i in range(400)))
    assert len(fast) == count + 1 and fast[-1][1] == pytest.approx(-0.5 * 1.1 ** count, rel=1e-9)
    for (piece, weight), (exact_piece, exact_weight) in zip(fast[:400], exact):
        assert piece == exact_piece
        assert weight == pytest.approx(exact_weight, rel=1e-9)


# Prompt editing and alternation ---------------------------------------------------------------

SCHEDULE_CASES = [
    # webui's documented examples (10 steps)
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
    # recorded from webui 1.10's parser
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),  # a | outside an alternation: no parse
    ("[a:[b:3]:5]", [(3, "a"), (5, "a"), (10, "b")]),
    ("[[a|b]:3]", [(1, ""), (2, ""), (3, ""), (4, "b"), (5, "a"), (6, "b"), (7, "a"), (8, "b"), (9, "a"), (10, "b")]),
    ("(a:[b:3])", [(3, "(a:)"), (10, "(a:b)")]),
    ("[a:b:2 ]", [(2, "a"), (10, "b")]),
    ("a | b", [(10, "a | b")]),
    ("[a:b:c:3]", [(10, "[a:b:c:3]")]),
    ("[a|b:3]", [(10, "[a|b:3]")]),
    ("a\\", [(10, "a\\")]),
    ("[a:b:0]", [(10, "b")]),
    ("[a:b:-2]", [(10, "b")]),
    ("[a:b:1e1]", [(10, "a")]),
    ("[a:b:25]", [(10, "a")]),
    ("[a:b:1.]", [(10, "a")]),
    ("[a:b:0.29]", [(2, "a"), (10, "b")]),
    ("\\[a:b:3\\]", [(10, "\\[a:b:3\\]")]),
    ("[a\\:b:3]", [(3, ""), (10, "a\\:b")]),
    ("(x:y:[a:3] )", [(3, "(x:y: )"), (10, "(x:y:a )")]),
    ("[a:b:3][c|d]", [(1, "ac"), (2, "ad"), (3, "ac"), (4, "bd"), (5, "bc"), (6, "bd"), (7, "bc"),
                      (8, "bd"), (9, "bc"), (10, "bd")]),
]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_CASES)
def test_prompt_schedule_as_webui(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_hires_and_old_scheduling():
    # webui's examples: in a hires pass of 10 steps after 10 base steps, fractions count from 1.0.
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:15] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("[a:b:3.0]", 10, use_old_scheduling=True) == [(3, "a"), (10, "b")]
    assert prompt_schedule("[a:b:3.0]", 10) == [(10, "a")]


def test_prompt_at_step_follows_webui_step_numbering():
    schedule = prompt_schedule("[cat:dog:3]", 10)
    assert [prompt_at_step(schedule, step) for step in range(10)] == ["cat"] * 4 + ["dog"] * 6
    assert prompt_at_step(schedule, 50) == "cat"  # past the end: webui falls back to the first
    with pytest.raises(ValueError, match="empty"):
        prompt_at_step([], 0)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", 0)
    with pytest.raises(ValueError, match="hires_steps"):
        prompt_schedule("a", 10, hires_steps=-1)
    with pytest.raises(ValueError, match="string"):
        prompt_schedule(3, 10)


def test_hostile_schedules_in_bounded_time():
    cases = {
        "[" * 10_000 + "a:b:3" + "]" * 10_000: 2,
        "[" * 10_000 + "a": 1,
        "[a:b:3]" * 140_000: 2,  # ~1 MB
        "x" * 1_000_000: 1,
        "[a|b" * 10_000 + "]" * 10_000: 20,
        "(" * 10_000 + "[a:b:1e400]" + ")" * 10_000: 1,
    }
    for prompt, segments in cases.items():
        start = time.perf_counter()
        schedule = prompt_schedule(prompt, 20)
        assert time.perf_counter() - start < 30, prompt[:12]
        assert len(schedule) == segments, prompt[:12]


# AND and extra networks ---------------------------------------------------------------------------


def test_split_composable():
    assert split_composable("a cat AND a dog :0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert split_composable("a cat") == [("a cat", 1.0)]
    assert split_composable("ANDROID AND b:-1") == [("ANDROID", 1.0), (" b", -1.0)]


def test_extra_networks_are_removed_and_loras_read():
    text, networks = extract_extra_networks("a <lora:detail:0.8> cat <hypernet:x:1>")
    assert text == "a  cat "
    assert [(n.kind, n.positional) for n in networks] == [("lora", ("detail", "0.8")), ("hypernet", ("x", "1"))]
    warnings = []
    text, loras = extract_loras("<lora:a> <lora:b:0.5> <lora:c:0.5:0.2> <lora:d:1:unet=0.3> <hypernet:x>", warnings.append)
    assert text.split() == []
    assert loras == [LoraReference("a", 1.0, 1.0), LoraReference("b", 0.5, 0.5), LoraReference("c", 0.5, 0.2),
                     LoraReference("d", 1.0, 0.3)]
    assert len(warnings) == 1 and "hypernet" in warnings[0]


def test_lora_arguments():
    assert parse_lora_argument("name:0.8") == LoraReference("name", 0.8, 0.8)
    assert parse_lora_argument("name") == LoraReference("name", 1.0, 1.0)
    for bad in ("name:abc", "name:nan", ":0.5"):
        with pytest.raises(ValueError, match="lora"):
            parse_lora_argument(bad)
    with pytest.raises(ValueError, match="not a number"):
        extract_loras("<lora:x:heavy>")
