"""The prompt language: text in, weighted runs of text out, in one left-to-right scan.

The rules (docs/prompts.md) are Automatic1111's, which people paste as they are, with compel's
forms beside them:
- `(words)` multiplies the words' weight by 1.1, `[words]` divides it by 1.1, `(words:1.3)`
  multiplies it by 1.3; nesting multiplies; a bracket left open applies to the rest of the prompt;
  a closing bracket with none open is the character itself; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are
  the characters; round and square brackets are counted apart, so they may cross.
- compel's `(words)1.3`, `(words)+`, `(words)-`, `word+`, `word--` (1.1 or 0.9 per sign), and
  `("a", "b").blend(0.7, 0.3)` / `("a", "b").and()` holding the whole prompt.

Why a scan of our own: compel's parser (pyparsing) backtracks, and its time grows exponentially
with nesting (33 characters of nested brackets had not parsed after 95 s). Here every character
is read once, a closing bracket reweighs only the runs since its opening one, and at most
MAX_DEPTH brackets are open at once: the work is linear in the prompt's length. Everything that
cannot be read is one InputError sentence naming the input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import InputError

MAX_WEIGHT = 10.0  # far past where images break down (about 1.6 for SD1.5), short of overflowing
MAX_DEPTH = 16  # brackets open at once: ((((((masterpiece)))))) is 6; a bound on the work per character
MAX_PARTS = 8  # prompts in one .blend() or .and(): each costs its own text-encoder passes
EMPHASIS = 1.1  # (words) multiplies by this, [words] divides by it
COMPEL_UP, COMPEL_DOWN = 1.1, 0.9  # compel's word+ and word- (per sign)
_MAX_SIGNS = 64  # 1.1 ** 64 is already far above MAX_WEIGHT: longer runs weigh no more (no overflow)

# One token at a time. Each alternative is tried at one position and cannot backtrack past the
# token: the scan stays linear.
_TOKEN = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\])                     # \( \) \[ \] \\ : the character
    |(?P<backslash>\\)                           # any other backslash is dropped (as in Automatic1111)
    |(?P<open>[(\[])
    |:[ \t]*(?P<weight>[+-]?[.,\d]+)[ \t]*(?P<weight_close>[)\]])   # (words:1.3); [a:b:0.5] is editing
    |\)(?P<number>\d+(?:\.\d*)?|\.\d+)           # compel: (words)1.3
    |\)(?P<close_signs>\++|-+)(?![\w+-])         # compel: (words)+, (words)--
    |(?P<close>[)\]])
    |(?P<signs>\++|-+)(?![\w+-])                 # compel: word+, word-- (straight after a word)
    |(?P<text>[^\\()\[\]:+-]+|[:+-])
    """,
    re.VERBOSE,
)
_OPERATOR = re.compile(r"\.(blend|and|add|swap|attend)\(|\b(?:with|use)Lora\(")
_WHOLE_OPERATORS = ("blend", "and", "add")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class Parsed:
    """A prompt as read: its parts (one, or those of a .blend() or .and()), each a tuple of (text,
    weight) runs with adjacent runs of one weight merged, and how the parts combine."""

    parts: tuple[tuple[tuple[str, float], ...], ...]
    weights: tuple[float, ...]  # one per part
    operator: str | None = None  # None (one prompt), "blend" or "and"
    normalize: bool = True  # blend: the weights are made to sum to 1 (compel's default)


def _quoted(text: str) -> str:
    """A piece of the prompt as an error message shows it: at most 60 characters."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


class _Bracket:
    __slots__ = ("kind", "start", "source", "alternation")

    def __init__(self, kind: str, start: int, source: int):
        self.kind, self.start, self.source = kind, start, source  # "(" or "[", first run, text position
        self.alternation = False  # a "|" seen while this was the innermost square bracket


class _Scan:
    """The runs of one weighted text, built token by token."""

    def __init__(self, text: str, name: str):
        self.text, self.name = text, name
        self.runs: list[list] = []  # [text, weight]
        self.open: list[_Bracket] = []  # in the order opened: innermost last
        self.sealed = True  # a bracket opened or closed since the last run: the next text is a new run

    def add_text(self, text: str) -> None:
        if not self.sealed:
            self.runs[-1][0] += text
            return
        self.runs.append([text, 1.0])
        self.sealed = False

    def opening(self, kind: str, source: int) -> None:
        if len(self.open) >= MAX_DEPTH:
            raise InputError(
                f"{self.name} nests brackets {len(self.open) + 1} deep; at most {MAX_DEPTH}.", field=self.name
            )
        self.open.append(_Bracket(kind, len(self.runs), source))
        self.sealed = True

    def innermost(self, kind: str) -> _Bracket | None:
        for bracket in reversed(self.open):
            if bracket.kind == kind:
                return bracket
        return None

    def closing(self, bracket: _Bracket, weight: float) -> None:
        self.open.remove(bracket)  # at most MAX_DEPTH to look through
        self._reweigh(bracket.start, weight)
        self.sealed = True

    def _reweigh(self, start: int, weight: float) -> None:
        # Each run is reweighed once per bracket around it, and at most MAX_DEPTH are: linear.
        for run in self.runs[start:]:
            run[1] *= weight

    def weigh_last_word(self, signs: str) -> bool:
        """compel's word+ / word-: the word just before the signs, in the run being written."""
        if self.sealed or not self.runs or not self.runs[-1][0] or self.runs[-1][0][-1].isspace():
            return False
        run = self.runs[-1]
        cut = len(run[0])
        while cut > 0 and not run[0][cut - 1].isspace() and run[0][cut - 1] not in ",;\"'":
            cut -= 1
        if cut == len(run[0]):
            return False
        word = run[0][cut:]
        run[0] = run[0][:cut]
        self.runs.append([word, run[1] * _sign_weight(signs)])
        if not run[0]:
            self.runs.pop(-2)
        self.sealed = True
        return True

    def finish(self) -> tuple[tuple[str, float], ...]:
        # Left open: to the end of the prompt, as in Automatic1111 (round ones first, in its order).
        for bracket in sorted(self.open, key=lambda bracket: bracket.kind != "("):
            self._reweigh(bracket.start, EMPHASIS if bracket.kind == "(" else 1 / EMPHASIS)
        merged: list[list] = []
        for text, weight in self.runs:
            if not text:
                continue
            if merged and merged[-1][1] == weight:
                merged[-1][0] += text
            else:
                merged.append([text, weight])
        return tuple((text, weight) for text, weight in merged) or (("", 1.0),)


def _sign_weight(signs: str) -> float:
    base = COMPEL_UP if signs[0] == "+" else COMPEL_DOWN
    return base ** min(len(signs), _MAX_SIGNS)


def _explicit_weight(scan: _Scan, bracket: _Bracket, written: str, end: int) -> float:
    group = scan.text[bracket.source : end]
    try:
        weight = float(written)
    except ValueError:
        raise InputError(
            f"{scan.name}: the weight in {_quoted(group)} is not a number; write it like (words:1.3).", field=scan.name
        ) from None
    if not 0 <= weight < math.inf:
        raise InputError(
            f"{scan.name}: the weight in {_quoted(group)} must be from 0 to {MAX_WEIGHT:g}.", field=scan.name
        )
    return weight


def weighted_runs(text: str, name: str = "prompt") -> tuple[tuple[str, float], ...]:
    """One weighted text (no .blend() or .and()) as (text, weight) runs."""
    found = _OPERATOR.search(text)
    if found:
        _refuse_operator(found, name)
    scan = _Scan(text, name)
    for token in _TOKEN.finditer(text):
        kind = token.lastgroup
        if kind == "weight_close":  # the pattern's last group: the weight and its bracket
            _weighted_close(scan, token)
        elif kind == "escape":
            scan.add_text(token.group()[1])
        elif kind == "open":
            scan.opening(token.group(), token.start())
        elif kind in ("number", "close_signs"):
            bracket = scan.innermost("(")
            if bracket is None:
                scan.add_text(token.group())
            elif kind == "number":
                scan.closing(bracket, _explicit_weight(scan, bracket, token["number"], token.end()))
            else:
                scan.closing(bracket, _sign_weight(token["close_signs"]))
        elif kind == "close":
            bracket = scan.innermost("(" if token.group() == ")" else "[")
            if bracket is None:
                scan.add_text(token.group())
            elif bracket.kind == "[" and bracket.alternation:
                _refuse_square(scan, bracket, token.end(), "alternation")
            else:
                scan.closing(bracket, EMPHASIS if bracket.kind == "(" else 1 / EMPHASIS)
        elif kind == "signs":
            if not scan.weigh_last_word(token.group()):
                scan.add_text(token.group())
        elif kind == "text":
            if "|" in token.group() and scan.open and scan.open[-1].kind == "[":
                scan.open[-1].alternation = True
            scan.add_text(token.group())
        # a lone backslash: dropped
    return scan.finish()


def _weighted_close(scan: _Scan, token: re.Match) -> None:
    closer = token["weight_close"]
    bracket = scan.innermost("(" if closer == ")" else "[")
    if bracket is None:  # no bracket of that kind open: the characters themselves
        scan.add_text(token.group())
    elif closer == "]":
        _refuse_square(scan, bracket, token.end(), "prompt editing")
    else:
        scan.closing(bracket, _explicit_weight(scan, bracket, token["weight"], token.end()))


def _refuse_square(scan: _Scan, bracket: _Bracket, end: int, what: str) -> None:
    raise InputError(
        f"{scan.name}: {_quoted(scan.text[bracket.source : end])} is Automatic1111's {what}, which is not "
        "supported; write [words] to weaken words, or \\[ for a literal bracket.",
        field=scan.name,
    )


def _refuse_operator(found: re.Match, name: str) -> None:
    operator = found.group(1)
    if operator == "swap":
        raise InputError(
            f"{name}: .swap() (prompt-to-prompt editing) is not supported; use .blend() or weights.", field=name
        )
    if operator is None:
        raise InputError(
            f"{name}: withLora() is not read here; send the LoRA as lora_weights or extra_lora.", field=name
        )
    if operator == "attend":
        raise InputError(f"{name}: .attend() is not supported; write (words)1.3 or (words:1.3).", field=name)
    raise InputError(
        f'{name}: .{operator}() must hold the whole prompt, as ("a cat", "a dog").{operator}(1, 1); it does not '
        "nest or sit inside other text.",
        field=name,
    )


def parse(text: str, name: str = "prompt") -> Parsed:
    """A whole prompt: one weighted text, or a .blend() / .and() of up to MAX_PARTS of them."""
    whole = _whole_operator(text)
    if whole is None:
        return Parsed((weighted_runs(text, name),), (1.0,))
    parts_text, operator, arguments = whole
    parts = _split_parts(parts_text, name, operator)
    if len(parts) > MAX_PARTS:
        raise InputError(f"{name}: .{operator}() takes at most {MAX_PARTS} prompts, got {len(parts)}.", field=name)
    weights, normalize = _operator_weights(arguments, len(parts), name, operator)
    runs = tuple(weighted_runs(part, name) for part in parts)
    return Parsed(runs, weights, "blend" if operator == "blend" else "and", normalize)


def _whole_operator(text: str) -> tuple[str, str, str] | None:
    """(the parts' text, the operator, its arguments) when the prompt is (...).blend(...) or
    (...).and(...) as a whole; None otherwise."""
    stripped = text.strip()
    if not (stripped.startswith("(") and stripped.endswith(")")):
        return None
    found = max(((stripped.rfind(f").{op}("), op) for op in _WHOLE_OPERATORS), default=(-1, ""))
    at, operator = found
    if at <= 0:
        return None
    arguments = stripped[at + len(operator) + 3 : -1]
    if "(" in arguments or ")" in arguments:
        return None
    return stripped[1:at], operator, arguments


def _split_parts(text: str, name: str, operator: str) -> list[str]:
    """The prompts of a .blend() or .and(): quoted ("a cat", with \\" for a quote) or bare text
    without a comma, separated by commas."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    index = 0
    while index < len(text):
        character = text[index]
        if quoted and character == "\\" and text[index + 1 : index + 2] == '"':
            current.append('"')
            index += 2
            continue
        if character == '"':
            quoted = not quoted
        elif character == "," and not quoted:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(character)
        index += 1
    if quoted:
        raise InputError(
            f'{name}: a quote in the prompts of .{operator}() is not closed; write them as "a cat".', field=name
        )
    parts.append("".join(current).strip())
    if not all(parts):
        raise InputError(
            f'{name}: .{operator}() has an empty prompt; write each as "a cat", separated by commas.', field=name
        )
    return parts


def _operator_weights(arguments: str, count: int, name: str, operator: str) -> tuple[tuple[float, ...], bool]:
    written = [argument.strip() for argument in arguments.split(",")] if arguments.strip() else []
    normalize = True
    if operator == "blend" and written and written[-1] == "no_normalize":
        normalize = False
        written.pop()
    if not written:
        return (1.0,) * count, normalize
    weights = []
    for argument in written:
        value = float(argument) if _NUMBER.fullmatch(argument) else math.nan
        if not 0 <= value <= MAX_WEIGHT:
            allowed = f"numbers from 0 to {MAX_WEIGHT:g}"
            raise InputError(
                f"{name}: the weights of .{operator}() must be {allowed}, got {_quoted(argument)}.", field=name
            )
        weights.append(value)
    if len(weights) != count:
        raise InputError(
            f"{name}: .{operator}() has {count} prompts but {len(weights)} weights; give one each.", field=name
        )
    if operator == "blend" and normalize and sum(weights) == 0:
        raise InputError(f"{name}: the weights of .blend() must not all be 0.", field=name)
    return tuple(weights), normalize
