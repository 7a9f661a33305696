"""The prompt language (fastsd.prompt_syntax, docs/prompts.md): Automatic1111's documented results,
a differential test against its rules over generated prompts, and property-based tests that every
prompt, however hostile, is read or refused with one sentence within a fixed time budget."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsd import prompt_syntax, prompts
from fastsd.errors import InputError
from fastsd.inputs import MAX_PROMPT_CHARACTERS

# A parse of the longest prompt accepted takes milliseconds; compel's parser took minutes for
# 33 characters. The budget is generous for a loaded two-core machine, and far below what it caught.
BUDGET_S = 1.0


def read_or_refused(text: str) -> prompts.Prompt | InputError:
    """The prompt read, or its refusal: never another exception, and within the budget."""
    started = time.perf_counter()
    try:
        result: prompts.Prompt | InputError = prompts.parse.__wrapped__(text, "prompt")
    except InputError as error:
        result = error
    elapsed = time.perf_counter() - started
    assert elapsed < BUDGET_S, f"{elapsed:.2f} s for {text[:80]!r}"
    return result


def one_sentence(error: InputError) -> str:
    message = str(error)
    assert message.startswith("prompt") and message.endswith("."), message
    assert "\n" not in message and "Traceback" not in message
    return message


# --- Automatic1111's own examples (modules/prompt_parser.py's documentation) ---------------------


@pytest.mark.parametrize(
    ("written", "runs"),
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
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),  # fmt: skip
    ],
)
def test_automatic1111s_documented_examples(written, runs):
    got = prompt_syntax.weighted_runs(written)
    assert [text for text, _ in got] == [text for text, _ in runs]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in runs])


@pytest.mark.parametrize(
    ("written", "runs"),
    [
        ("(cat)1.3 dog+ (red)- ", [("cat", 1.3), (" ", 1.0), ("dog", 1.1), (" ", 1.0), ("red", 0.9), (" ", 1.0)]),
        ("(cat:1.3)2 dogs", [("cat", 1.3), ("2 dogs", 1.0)]),  # an explicit weight wins over what follows
        ("(cat: 1.3)", [("cat", 1.3)]),  # spaces around the weight (Automatic1111 would read them as text)
        ("C++ code", [("C", 1.1 * 1.1), (" code", 1.0)]),
        ("an x-ray+, 16-bit", [("an ", 1.0), ("x-ray", 1.1), (", 16-bit", 1.0)]),
        ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),  # round and square brackets may cross
        ("smile :) (dog", [("smile :) ", 1.0), ("dog", 1.1)]),  # a closing bracket with none open is text
        ("a\\b \\\\", [("ab \\", 1.0)]),  # a lone backslash is dropped, \\ is one
        ("(style: watercolor)", [("style: watercolor", 1.1)]),
        ("[cat:dog]", [("cat:dog", 1 / 1.1)]),  # no number: not prompt editing
    ],
)
def test_compels_forms_and_the_edges(written, runs):
    got = prompt_syntax.weighted_runs(written)
    assert [text for text, _ in got] == [text for text, _ in runs]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in runs])


# --- a differential test against Automatic1111's rules ----------------------------------------

_A1111_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")


def automatic1111(text: str) -> list[tuple[str, float]]:
    """Automatic1111's documented rules, written plainly (quadratic, unbounded: an oracle only):
    each token in turn; a closing bracket multiplies every run since its opening one; brackets left
    open multiply to the end; adjacent runs of one weight merge."""
    runs: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []
    for token in _A1111_TOKEN.finditer(text):
        written, weight = token.group(), token.group(1)
        if written.startswith("\\"):
            runs.append([written[1:], 1.0])
        elif written in ("(", "["):
            (rounds if written == "(" else squares).append(len(runs))
        elif (weight is not None or written == ")") and rounds:
            factor = float(weight) if weight is not None else 1.1
            for run in runs[rounds.pop() :]:
                run[1] *= factor
        elif written == "]" and squares:
            for run in runs[squares.pop() :]:
                run[1] /= 1.1
        else:
            runs.append([written, 1.0])
    for start in rounds:
        for run in runs[start:]:
            run[1] *= 1.1
    for start in squares:
        for run in runs[start:]:
            run[1] /= 1.1
    merged: list[list] = []
    for written, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += written
        elif written:
            merged.append([written, weight])
    return [(written, weight) for written, weight in merged] or [("", 1.0)]


# What both syntaxes read alike: words, commas, brackets, A1111 weights and escapes. (Not compel's
# `)1.3`, `)+` and `word+`, nor what fastsd refuses: [a:b:0.5], [a|b], negative weights.)
_A1111_PIECES = st.one_of(
    st.sampled_from(["a", "cat", " ", ", ", "sun", "hill.", "(", ")", "[", "]", "\\(", "\\)", "\\[", "\\]", "\\\\"]),
    st.sampled_from(["0", "0.5", "1", "1.3", "2", ".7"]).map(lambda weight: f":{weight})"),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_A1111_PIECES, max_size=40))
def test_reads_automatic1111_prompts_as_automatic1111_does(pieces):
    text = "".join(pieces)
    if text.count("(") - text.count("\\(") + text.count("[") - text.count("\\[") > prompt_syntax.MAX_DEPTH:
        return  # nesting past the bound is refused (tested below)
    # Text that becomes empty or blank only shifts where equal weights merge; compare what is said.
    got = [(written, weight) for written, weight in prompt_syntax.weighted_runs(text)]
    expected = automatic1111(text)
    assert "".join(w for w, _ in got) == "".join(w for w, _ in expected)
    assert [w for w, _ in got] == [w for w, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)


# --- every prompt is read or refused, in bounded time ------------------------------------------

_HOSTILE = st.sampled_from(
    ["(", ")", "[", "]", "\\", '"', ",", ":", "+", "-", ".", "|", " ", "a", "1", "1.5", "e400", "nan",
     ".blend(", ".and(", ").blend(", ").and(", ".swap(", "withLora(", "no_normalize", '("a", "b")']
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_HOSTILE, max_size=200))
def test_any_mix_of_the_syntax_is_read_or_refused_with_one_sentence(pieces):
    result = read_or_refused("".join(pieces))
    if isinstance(result, InputError):
        one_sentence(result)
    else:
        weights = [fragment.weight for part in result.conjunction.prompts for fragment in _fragments(part)]
        assert all(0 <= weight <= prompt_syntax.MAX_WEIGHT for weight in weights)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_read_or_refused_with_one_sentence(text):
    result = read_or_refused(text)
    if isinstance(result, InputError):
        one_sentence(result)


def _fragments(part):
    flattened = part.prompts if hasattr(part, "prompts") else [part]
    return [fragment for flat in flattened for fragment in flat.children]


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("[" * 16 + "a" + "]" * 16, None),  # the probe's 33 characters: read at once
        ("(" * 16 + "a" + ")" * 16, None),  # 16 deep is read (1.1 ** 16 = 4.59), 17 is refused
        ("(" * 17 + "a" + ")" * 17, "prompt nests brackets 17 deep; at most 16."),
        ("(" * 300 + "a" + ")" * 300, "prompt nests brackets 17 deep; at most 16."),
        ("[" * 50 + "a" + "]" * 50, "prompt nests brackets 17 deep; at most 16."),
        ("a" + "+" * 9999, "the weight of 'a' comes to"),
        ('("a", "b").blend(1e400, nan)', "the weights of .blend() must be numbers from 0 to 10, got '1e400'."),
        ('("a", "b").blend(nan, 1)', "got 'nan'"),
        ('("a", "b").blend(0, 0)', "the weights of .blend() must not all be 0."),
        ('("a", "b", "c").blend(1, 2)', ".blend() has 3 prompts but 2 weights; give one each."),
        ("(" + ", ".join(['"a"'] * 1000) + ").blend()", ".blend() takes at most 8 prompts, got 1000."),
        ("(" * 6 + "a" + ").and()" * 6, ".and() must hold the whole prompt"),  # nested: 55 s in compel
        ('("a", ("b", "c").and()).and()', ".and() must hold the whole prompt"),
        ('("a", "b).blend(1, 1)', "a quote in the prompts of .blend() is not closed"),
        ('("a", "").and()', ".and() has an empty prompt"),
        ("(cat:1,5)", "the weight in '(cat:1,5)' is not a number; write it like (words:1.3)."),
        ("(cat:1.2.3)", "is not a number"),
        ("(cat:-1)", "the weight in '(cat:-1)' must be from 0 to 10."),
        ("(cat:" + "9" * 400 + ")", "must be from 0 to 10."),
        ("(cat:50)", "the weight of 'cat' comes to 50; a weight must come to between 0 and 10."),
        ("(cat)50", "the weight of 'cat' comes to 50"),
        ("[cat:dog:0.5]", "Automatic1111's prompt editing, which is not supported"),
        ("[cat:0.5]", "Automatic1111's prompt editing"),
        ("[cat|dog]", "Automatic1111's alternation, which is not supported"),
        ("a cat.swap(dog)", ".swap() (prompt-to-prompt editing) is not supported"),
        ("(cat).attend(1.2)", ".attend() is not supported"),
        ("withLora(name, 0.8)", "send the LoRA as lora_weights or extra_lora"),
        ('("a", "b").blend(x, y)', "got 'x'."),
        ('("a", "b").blend(1, 1) and more', ".blend() must hold the whole prompt"),
    ],
)
def test_the_probes_prompts_are_answered_at_once(written, message):
    result = read_or_refused(written)
    if message is None:
        assert isinstance(result, prompts.Prompt)
    elif isinstance(result, prompts.Prompt):
        pytest.fail(f"{written[:40]!r} was read, expected the refusal {message!r}")
    else:
        assert message in one_sentence(result)


@pytest.mark.parametrize(
    "piece",
    ["((a)", "[[a]", "(a:1.3)", "a+ ", "\\(", '("a", "b").and()', "a.blend(", "((((((((", "[a|b", ":1)"],
)
def test_the_longest_prompt_of_any_piece_is_read_in_the_budget(piece):
    """MAX_PROMPT_CHARACTERS of one piece repeated: the work grows with the length, no faster."""
    result = read_or_refused((piece * (MAX_PROMPT_CHARACTERS // len(piece) + 1))[:MAX_PROMPT_CHARACTERS])
    if isinstance(result, InputError):
        one_sentence(result)


def test_a_blend_reads_its_parts_with_the_whole_syntax():
    parsed = prompt_syntax.parse('("a (red:1.5) boat", "a \\"quoted\\" (dog)").blend(0.7, 0.3)')
    assert parsed.operator == "blend" and parsed.weights == (0.7, 0.3) and parsed.normalize
    assert parsed.parts[0] == (("a ", 1.0), ("red", 1.5), (" boat", 1.0))
    assert parsed.parts[1] == (('a "quoted" ', 1.0), ("dog", 1.1))
    assert prompt_syntax.parse('("a", "b").blend(1, 2, no_normalize)').normalize is False
    assert prompt_syntax.parse("(a cat, a dog).and()").parts == ((("a cat", 1.0),), (("a dog", 1.0),))
