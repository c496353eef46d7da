"""AUTOMATIC1111's prompt emphasis syntax and extra-network tags (webui 1.10 `prompt_parser.py`,
`extra_networks.py`, the built-in Lora extension), written for sdgen.

Emphasis: `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)`
multiplies by 1.3; brackets nest and multiply. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters
and a backslash before anything else is dropped. A closing bracket with no opener is plain text,
an opener never closed applies its factor up to the end of the prompt. `BREAK` (a whole word, in
capitals) ends the current 75-token chunk. Neighbouring pieces of equal weight are merged.

Two deliberate differences from webui, both on inputs where webui fails: a weight that is not a
number (`(a:1.2.3)`, `(a:.)`) is kept as plain text instead of raising, and a prompt whose brackets
would take more than `EXACT_WORK` weight updates (a hostile 1 MB prompt of nested brackets) has its
weights computed in log space in linear time, equal to webui's up to rounding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # the marker weight webui gives a BREAK piece
# Above this many (piece, bracket) weight updates the linear-time path is used.
EXACT_WORK = 2_000_000

# One token per match: an escape (a lone backslash has no group), an opener, a weight closing a
# round bracket, a closer, a run of plain text, or a lone colon.
_TOKEN = re.compile(
    r"\\(?P<escaped>[()\[\]\\])?"
    r"|(?P<open>[(\[])"
    r"|:\s*(?P<weight>[+-]?[.\d]+)\s*\)"
    r"|(?P<close>[)\]])"
    r"|(?P<text>[^\\()\[\]:]+|:)"
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Pieces of `text` with their emphasis weights, as webui's `parse_prompt_attention`;
    a BREAK is the piece `("BREAK", -1.0)` (its weight multiplied by any bracket around it)."""
    if not isinstance(text, str):
        raise ValueError(f"the prompt must be a string, got {type(text).__name__}")
    pieces: list[str] = []
    initial: list[float] = []
    # (first piece, end piece, factor) in the order webui multiplies the ranges.
    events: list[tuple[int, int, float]] = []
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _TOKEN.finditer(text):
        token = match[0]
        weight = _number(match["weight"]) if match["weight"] is not None else None
        if token[0] == "\\":
            pieces.append(match["escaped"] or "")
            initial.append(1.0)
        elif match["open"] == "(":
            round_open.append(len(pieces))
        elif match["open"] == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            events.append((round_open.pop(), len(pieces), weight))
        elif match["close"] == ")" and round_open:
            events.append((round_open.pop(), len(pieces), ROUND_FACTOR))
        elif match["close"] == "]" and square_open:
            events.append((square_open.pop(), len(pieces), SQUARE_FACTOR))
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i > 0:
                    pieces.append(BREAK)
                    initial.append(BREAK_WEIGHT)
                pieces.append(part)
                initial.append(1.0)
    events += [(start, len(pieces), ROUND_FACTOR) for start in round_open]
    events += [(start, len(pieces), SQUARE_FACTOR) for start in square_open]
    if not pieces:
        return [("", 1.0)]
    weights = _apply_factors(initial, events)
    merged: list[tuple[str, float]] = []
    run: list[str] = [pieces[0]]
    for piece, weight, previous in zip(pieces[1:], weights[1:], weights):
        if weight == previous:
            run.append(piece)
        else:
            merged.append(("".join(run), previous))
            run = [piece]
    merged.append(("".join(run), weights[-1]))
    return merged


def _apply_factors(initial: list[float], events: list[tuple[int, int, float]]) -> list[float]:
    """Multiply each range [start, end) by its factor, in event order (webui's float rounding)."""
    if sum(end - start for start, end, _ in events) <= EXACT_WORK:
        weights = list(initial)
        for start, end, factor in events:
            for i in range(start, end):
                weights[i] *= factor
        return weights
    # Linear time: per piece, the sum of log|factor| and the counts of zero, infinite and negative
    # factors over the ranges covering it, from prefix sums of range starts and ends.
    size = len(initial)
    logs = [0.0] * (size + 1)
    counts = {kind: [0] * (size + 1) for kind in ("zero", "infinite", "negative")}
    for start, end, factor in events:
        for kind, applies in (("zero", factor == 0), ("infinite", math.isinf(factor)), ("negative", factor < 0)):
            if applies:
                counts[kind][start] += 1
                counts[kind][end] -= 1
        if factor != 0 and math.isfinite(factor):
            logs[start] += math.log(abs(factor))
            logs[end] -= math.log(abs(factor))
    weights = []
    columns = zip(initial, accumulate(logs), *(accumulate(counts[k]) for k in ("zero", "infinite", "negative")))
    for w, log, zero, infinite, negative in columns:
        magnitude = math.inf if infinite or log > 709.0 else math.exp(log)
        magnitude = magnitude * 0.0 if zero else magnitude  # 0 * inf is nan, as in webui
        weights.append(w * magnitude * (-1.0 if negative % 2 else 1.0))
    return weights


# Composable diffusion ----------------------------------------------------------------------------


def split_composable(prompt: str) -> list[tuple[str, float]]:
    """`a cat AND a dog :0.5` -> [("a cat", 1.0), (" a dog", 0.5)]: webui's AND sub-prompts with
    their weights (Liu et al. 2022, Composable Diffusion); trailing whitespace is dropped."""
    parts = []
    for sub in _AND.split(prompt):
        match = _AND_WEIGHT.fullmatch(sub)
        parts.append((match[1], float(match[2]) if match[2] is not None else 1.0))
    return parts


# Extra networks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:arg1:arg2:key=value>` tag: positional and named arguments as written."""

    kind: str
    positional: tuple[str, ...]
    named: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        items = [*self.positional, *(f"{k}={v}" for k, v in self.named.items())]
        return f"<{self.kind}:{':'.join(items)}>"


@dataclass(frozen=True)
class LoraReference:
    """A LoRA asked for by name, with its text-encoder and U-Net multipliers."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove every `<kind:...>` tag from the prompt, as webui does before parsing the rest."""
    found: list[ExtraNetwork] = []

    def take(match: re.Match) -> str:
        items = match[2].split(":")
        positional = tuple(item for item in items if "=" not in item)
        named = dict(item.split("=", 1) for item in items if "=" in item)
        found.append(ExtraNetwork(match[1], positional, named))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def _weight(value: str, what: str, source: str) -> float:
    number = _number(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"{source}: the {what} {value!r} is not a number; write e.g. <lora:name:0.8>")
    return number


def lora_reference(network: ExtraNetwork) -> LoraReference:
    """webui's `<lora:name:te:unet>` / `<lora:name:0.8:unet=0.5>`: the U-Net multiplier defaults to
    the text-encoder one, which defaults to 1."""
    if network.kind != "lora" or not network.positional or not network.positional[0].strip():
        raise ValueError(f"{network.text}: expected <lora:name> or <lora:name:weight>")
    name, args = network.positional[0].strip(), network.positional[1:]
    te = _weight(args[0], "weight", network.text) if args else 1.0
    te = _weight(network.named["te"], "te weight", network.text) if "te" in network.named else te
    unet = _weight(args[1], "unet weight", network.text) if len(args) > 1 else te
    unet = _weight(network.named["unet"], "unet weight", network.text) if "unet" in network.named else unet
    return LoraReference(name, te, unet)


def extract_loras(prompt: str, warn: Callable[[str], None] | None = None) -> tuple[str, list[LoraReference]]:
    """The prompt without extra-network tags, and the `<lora:...>` references in it; other tag
    kinds (hypernetworks...) are removed too and reported through `warn`."""
    text, networks = extract_extra_networks(prompt)
    loras = []
    for network in networks:
        if network.kind == "lora":
            loras.append(lora_reference(network))
        elif warn is not None:
            warn(f"{network.text}: extra network kind {network.kind!r} is not supported; ignored")
    return text, loras


def parse_lora_argument(value: str) -> LoraReference:
    """The command-line form `name`, `name:0.8` or `name:te:unet` (as inside `<lora:...>`)."""
    return lora_reference(ExtraNetwork("lora", *_split_argument(value)))


def _split_argument(value: str) -> tuple[tuple[str, ...], dict[str, str]]:
    items = value.split(":")
    return tuple(i for i in items if "=" not in i), dict(i.split("=", 1) for i in items if "=" in i)
