"""AUTOMATIC1111's prompt editing and alternation (webui 1.10 `get_learned_conditioning_prompt_schedules`).

`[from:to:when]` uses `from` until step `when`, then `to`; `[to:when]` adds `to` after `when`,
`[from::when]` drops `from` after it. `when` with a decimal point is a fraction of the steps
(`0.25`, `1.5` in a hires pass), without one an absolute step. `[a|b|c]` alternates every step.
A prompt becomes a list of segments `(until_step, text)`: the text to use while the (0-based)
sampling step is <= until_step, as webui's `reconstruct_cond_batch` picks them.

webui parses with a lark Earley grammar: inside a bracket group every bracket, colon and bar must
belong to a well-formed group; at the top level, brackets and colons that fit no group are plain
text; a `|` outside an alternation, or a backslash at the end of a line, fails the whole parse and
the prompt is used as written. Well-formed groups nest or are disjoint, and the grammar prefers
the structured reading, so one left-to-right pass with a stack of open groups decides each group
(no recursion: 10,000 nested brackets are fine). Texts are rendered verbatim apart from the
editing and alternation groups, so emphasis brackets stay for `parse_prompt_attention`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar, Union

T = TypeVar("T")

# lark's SIGNED_NUMBER, alternatives in its order (first match wins, no backtracking).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACE = re.compile(r"\s*")
# An escape pair (no newline after the backslash), a backslash that escapes nothing, a delimiter, plain text.
_TOKEN = re.compile(r"\\.|(?P<bad>\\)|(?P<delimiter>[\[\]():|])|[^\\\[\]():|]+")
_CLOSER = {"(": ")", "[": "]"}


class _Separator(str):
    """A `:` or `|` directly inside a group: renders as itself, splits edits and alternations."""


@dataclass
class _Edit:
    """`[before:after:when]`; `before` is None for `[after:when]`."""

    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternation:
    options: list[list]


Piece = Union[str, list, _Edit, _Alternation]


@dataclass
class _Group:
    opener: str
    pieces: list[Piece] = field(default_factory=list)
    well_formed: bool = True


class _ParseFailed(Exception):
    """The grammar has no parse: webui then uses the prompt as written."""


def _split(pieces: list[Piece]) -> tuple[list[list[Piece]], set[str]]:
    parts: list[list[Piece]] = [[]]
    separators = set()
    for piece in pieces:
        if isinstance(piece, _Separator):
            parts.append([])
            separators.add(str(piece))
        else:
            parts[-1].append(piece)
    return parts, separators


def _edit_number(part: list[Piece]) -> str | None:
    """The number of `[... : NUMBER]`: optional whitespace, a number, optional whitespace."""
    if not all(type(p) is str for p in part):
        return None
    text = "".join(part)
    start = _SPACE.match(text).end()
    number = _NUMBER.match(text, start)
    if number is None or _SPACE.match(text, number.end()).end() != len(text):
        return None
    return number[0]


def _structure(group: _Group) -> Piece | None:
    """The reading of a closed, well-formed group: emphasis (kept as text), edit or alternation."""
    parts, separators = _split(group.pieces)
    if group.opener == "(":
        ok = "|" not in separators and len(parts) <= 2
        return ["(", group.pieces, ")"] if ok else None
    if not separators:
        return ["[", group.pieces, "]"]
    if separators == {"|"}:
        return _Alternation(parts)
    if separators == {":"} and len(parts) in (2, 3):
        number = _edit_number(parts[-1])
        if number is not None:
            return _Edit(parts[0] if len(parts) == 3 else None, parts[-2], number)
    return None


def _parse(prompt: str) -> list[Piece]:
    """The prompt as pieces: text, nested lists of pieces, edits and alternations."""
    top: list[Piece] = []
    stack: list[_Group] = []

    def fail(group: _Group, closer: str) -> None:
        # Its brackets become plain text around its pieces; a `|` cannot be plain text.
        if any(isinstance(p, _Separator) and p == "|" for p in group.pieces):
            raise _ParseFailed
        (stack[-1].pieces if stack else top).append([group.opener, group.pieces, closer])
        if stack:
            stack[-1].well_formed = False

    for match in _TOKEN.finditer(prompt):
        token = match[0]
        if match["bad"]:
            raise _ParseFailed
        if not match["delimiter"]:
            (stack[-1].pieces if stack else top).append(token)
        elif token in "([":
            stack.append(_Group(token))
        elif token in ":|":
            if stack:
                stack[-1].pieces.append(_Separator(token))
            elif token == "|":
                raise _ParseFailed
            else:
                top.append(token)
        elif stack and _CLOSER[stack[-1].opener] == token:
            group = stack.pop()
            reading = _structure(group) if group.well_formed else None
            if reading is None:
                fail(group, token)
            else:
                (stack[-1].pieces if stack else top).append(reading)
        else:  # a closer that closes nothing: plain text, so the group around it is not well formed
            (stack[-1].pieces if stack else top).append(token)
            if stack:
                stack[-1].well_formed = False
    while stack:
        fail(stack.pop(), "")
    return top


def _walk(pieces: list[Piece]):
    """Every piece, nested ones included, in document order (iterative)."""
    stack = [iter(pieces)]
    while stack:
        piece = next(stack[-1], None)
        if piece is None:
            stack.pop()
            continue
        yield piece
        if isinstance(piece, list):
            stack.append(iter(piece))
        elif isinstance(piece, _Edit):
            stack.append(iter([piece.before or [], piece.after]))
        elif isinstance(piece, _Alternation):
            stack.append(iter(piece.options))


def _render(pieces: list[Piece], step: int) -> str:
    out: list[str] = []
    stack = [iter(pieces)]
    while stack:
        piece = next(stack[-1], None)
        if piece is None:
            stack.pop()
        elif isinstance(piece, str):
            out.append(piece)
        elif isinstance(piece, list):
            stack.append(iter(piece))
        elif isinstance(piece, _Edit):
            stack.append(iter((piece.before or []) if step <= piece.when else piece.after))
        else:
            stack.append(iter(piece.options[(step - 1) % len(piece.options)]))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None,
                    use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """[(until_step, text), ...] for `steps` sampling steps, as webui 1.10. With `hires_steps`, the
    schedule of a hires pass: whole numbers count on from the first pass (`[a:b:25]` after 20 base
    steps switches at hires step 5), fractions from 1.0 (`[a:b:1.5]`: halfway through the hires pass).
    `use_old_scheduling`: webui's pre-1.6 rule (a number below 1 is a fraction, else a step)."""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be a string, got {type(prompt).__name__}")
    for name, value in (("steps", steps), ("hires_steps", hires_steps)):
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if hires_steps is None or use_old_scheduling:
        whole_offset, fraction_offset, total = 0, 0.0, steps
    else:
        whole_offset, fraction_offset, total = steps, 1.0, hires_steps
    try:
        pieces = _parse(prompt)
    except _ParseFailed:
        return [(total, prompt)]
    boundaries = {total}
    for piece in _walk(pieces):
        if isinstance(piece, _Alternation):
            boundaries.update(range(1, total + 1))
        elif isinstance(piece, _Edit):
            value = float(piece.number)
            if use_old_scheduling:
                value = value * total if value < 1 else value
            elif "." in piece.number:
                value = (value - fraction_offset) * total
            else:
                value = value - whole_offset
            # int() truncates toward zero, as webui; infinities clamp instead of raising.
            piece.when = min(total, int(value)) if math.isfinite(value) else (total if value > 0 else -1)
            if piece.when >= 1:
                boundaries.add(piece.when)
    return [(step, _render(pieces, step)) for step in sorted(boundaries)]


def prompt_at_step(schedule: Sequence[tuple[int, T]], step: int) -> T:
    """The entry of a schedule for the 0-based sampling `step`: the first with step <= until_step
    (webui's `reconstruct_cond_batch`; past the end it falls back to the first entry, as webui)."""
    if not schedule:
        raise ValueError("the schedule is empty; build it with prompt_schedule()")
    for until, value in schedule:
        if step <= until:
            return value
    return schedule[0][1]
