"""The caption parser: any caption in the scene grammar -> typed claims the checker can test.

Shapes captions are parsed by recursive descent over words (group list or relation, then an
optional background); landscape captions by longest-match phrases, filler words skipped. The
inverse of captions.write_caption: every written caption parses to claims true of its record.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdgen.errors import UserError
from sdgen.train.scenes.vocabulary import (
    COLOUR_WORDS, COUNT_WORDS, HELDOUT_COLOUR_SHAPES, HELDOUT_LANDSCAPES, HELDOUT_RELATIONS,
    LANDSCAPE_FILLERS, LANDSCAPE_PHRASES, POSITION_SYNONYMS, PREFIXES, RELATION_WORDINGS,
    SHAPE_PLURALS, SHAPE_WORDS, SIZE_WORDS, TIMES, words_of,
)

CATEGORIES = ("colour", "shape", "count", "size", "position", "relation", "background", "landscape")


@dataclass(frozen=True)
class Target:
    """The objects a claim is about: those of this colour and shape (count None: not said)."""

    colour: str
    shape: str
    count: int | None = 1


@dataclass(frozen=True)
class Claim:
    """One checkable statement. value: colour / shape / count / size / position / relation name,
    ("solid", c) or ("gradient", top, bottom) for backgrounds, an element or time for landscapes."""

    category: str
    value: str | int | tuple[str, ...]
    target: Target | None = None
    other: Target | None = None  # the second group of a relation

    def __str__(self) -> str:
        def name(t: Target) -> str:
            return f"{t.count or 'some'} {t.colour} {t.shape}"
        if self.category == "relation":
            return f"relation: {name(self.target)} {self.value} {name(self.other)}"
        about = f" ({name(self.target)})" if self.target else ""
        value = " ".join(self.value) if isinstance(self.value, tuple) else self.value
        return f"{self.category}: {value}{about}"


class CaptionError(UserError, ValueError):
    """A caption outside the grammar; the message names the part that could not be parsed."""


def parse_caption(caption: str) -> list[Claim]:
    """Claims made by a caption in the scene grammar (docs/SCENES.md), without duplicates."""
    if not isinstance(caption, str) or len(caption) > 1000:
        raise CaptionError("a caption must be a string of at most 1000 characters")
    words = words_of(caption)
    if not words:
        raise CaptionError(f"empty caption {caption!r}: name at least one object or landscape element")
    for prefix in PREFIXES:  # "a picture of ..." says nothing about the scene
        if words[:len(prefix.split())] == prefix.split() and len(words) > len(prefix.split()):
            words = words[len(prefix.split()):]
            break
    claims = _parse_landscape(words, caption) if _is_landscape(words) else _ShapesParser(words, caption).parse()
    return list(dict.fromkeys(claims))


def claims_heldout(claims: list[Claim]) -> bool:
    """Whether the claims name a held-out combination (vocabulary.HELDOUT_*)."""
    features = {c.value for c in claims if c.category == "landscape"}
    if any(combo <= features for combo in HELDOUT_LANDSCAPES):
        return True
    for c in claims:
        if c.category == "count" and (c.target.colour, c.target.shape) in HELDOUT_COLOUR_SHAPES:
            return True
        if c.category == "relation" and (c.target.shape, c.value, c.other.shape) in HELDOUT_RELATIONS:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Landscapes
# --------------------------------------------------------------------------------------------

# Words that only landscapes use ("stars" is also a shape, "blue" in "blue sky" also a colour).
_LANDSCAPE_MARKERS = ({w for phrase in LANDSCAPE_PHRASES for w in phrase.split()} | {"sky"}) - {"stars"} - set(COLOUR_WORDS)
_MAX_PHRASE = max(len(p.split()) for p in LANDSCAPE_PHRASES)


def _is_landscape(words: list[str]) -> bool:
    return any(w in _LANDSCAPE_MARKERS for w in words)


def _parse_landscape(words: list[str], caption: str) -> list[Claim]:
    claims: list[str] = []
    i = 0
    while i < len(words):
        for n in range(min(_MAX_PHRASE, len(words) - i), 0, -1):
            phrase = " ".join(words[i:i + n])
            if phrase in LANDSCAPE_PHRASES:
                # the element first, then what it implies ("snowy": snow, then mountains)
                claims += sorted(LANDSCAPE_PHRASES[phrase], key=lambda c: (c in TIMES, c == "mountains"))
                i += n
                break
        else:
            if words[i] not in LANDSCAPE_FILLERS and words[i] != ",":
                raise CaptionError(f"cannot parse {' '.join(words[i:])!r} in landscape caption "
                                   f"{caption!r}: unknown word {words[i]!r}")
            i += 1
    return [Claim("landscape", c) for c in claims]


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

_RELATION_PHRASES = {w: r for r, wordings in RELATION_WORDINGS.items() for w in wordings}
_VERTICAL = {"top": "top", "bottom": "bottom", "upper": "top", "lower": "bottom"}
_HORIZONTAL = {"left", "right"}


class _ShapesParser:
    """Recursive descent: caption := groups [background]; groups := group (relation group
    | (("," | "and") group)*); group := [count] [size] colour shape [position]."""

    def __init__(self, words: list[str], caption: str) -> None:
        self.words, self.caption, self.i = words, caption, 0

    def fail(self, what: str) -> CaptionError:
        rest = " ".join(self.words[self.i:]) or "the end"
        return CaptionError(f"cannot parse {rest!r} in {self.caption!r}: expected {what}")

    def peek(self, n: int = 1) -> str:
        return " ".join(self.words[self.i:self.i + n])

    def take(self, phrase: str) -> bool:
        n = len(phrase.split())
        if self.peek(n) == phrase:
            self.i += n
            return True
        return False

    def parse(self) -> list[Claim]:
        first = self.group()
        claims = list(first[1])
        relation = self.relation()
        if relation:
            second = self.group()
            claims += second[1] + [Claim("relation", relation, first[0], second[0])]
        else:
            while self.take(",") or self.take("and"):
                claims += self.group()[1]
        claims += self.background()
        if self.i < len(self.words):
            raise self.fail("the end of the caption, a background ('on a white background') "
                            "or another object after 'and'")
        return claims

    def group(self) -> tuple[Target, list[Claim]]:
        count = COUNT_WORDS.get(self.peek())
        if count is not None:
            self.i += 1
        size = SIZE_WORDS.get(self.peek())
        if size:
            self.i += 1
        colour = COLOUR_WORDS.get(self.peek())
        if colour is None:
            raise self.fail("a colour (" + ", ".join(sorted(set(COLOUR_WORDS.values()))) + ")")
        self.i += 1
        noun = self.peek()
        shape = SHAPE_WORDS.get(noun)
        if shape is None:
            raise self.fail("a shape (" + ", ".join(sorted(set(SHAPE_WORDS.values()))) + ")")
        self.i += 1
        plural = noun != shape
        if count is None:
            count = None if plural else 1
        elif plural != (count > 1):
            self.i -= 1
            plural_noun = SHAPE_PLURALS[shape]
            raise self.fail(f"'{shape}' after one or '{plural_noun}' after more: the count and the noun disagree")
        target = Target(colour, shape, count)
        claims = [Claim("colour", colour, target), Claim("shape", shape, target)]
        if count is not None:
            claims.append(Claim("count", count, target))
        if size:
            claims.append(Claim("size", size, target))
        position = self.position()
        if position:
            claims.append(Claim("position", position, target))
        return target, claims

    def relation(self) -> str | None:
        for phrase in sorted(_RELATION_PHRASES, key=lambda p: -len(p.split())):
            if self.take(phrase):
                return _RELATION_PHRASES[phrase]
        return None

    def position(self) -> str | None:
        """[in|at|on|near] the (vertical [horizontal] | horizontal | center|middle) [corner|side]."""
        start = self.i
        if self.peek() in ("in", "at", "on", "near") and self.words[self.i + 1:self.i + 2] == ["the"]:
            self.i += 2
        else:
            return None
        word = POSITION_SYNONYMS.get(self.peek(), self.peek())
        if word in ("center", "middle"):
            self.i += 1
            return "center"
        vertical = _VERTICAL.get(word)
        if vertical:
            self.i += 1
            word = self.peek()
        horizontal = word if word in _HORIZONTAL else None
        if horizontal:
            self.i += 1
        if not vertical and not horizontal:
            self.i = start
            raise self.fail("a position (top left, top, top right, left, center, right, bottom ...)")
        if vertical and horizontal:
            self.take("corner")
        elif horizontal:
            self.take("side")
        return " ".join(p for p in (vertical, horizontal) if p)

    def background(self) -> list[Claim]:
        """(on|against) [a|an] (colour [background] | colour to colour gradient
        | gradient from colour to colour)."""
        if not (self.take("on") or self.take("against")):
            return []
        self.take("a") or self.take("an")
        self.take("plain")
        if self.take("gradient"):
            if not self.take("from"):
                raise self.fail("'from' as in 'a gradient from blue to purple'")
            top = self.colour()
            if not self.take("to"):
                raise self.fail("'to' as in 'a gradient from blue to purple'")
            return [Claim("background", ("gradient", top, self.colour()))]
        top = self.colour()
        if self.take("to"):
            bottom = self.colour()
            if not self.take("gradient"):
                raise self.fail("'gradient' as in 'a blue to purple gradient'")
            return [Claim("background", ("gradient", top, bottom))]
        self.take("background")
        return [Claim("background", ("solid", top))]

    def colour(self) -> str:
        colour = COLOUR_WORDS.get(self.peek())
        if colour is None:
            raise self.fail("a colour (" + ", ".join(sorted(set(COLOUR_WORDS.values()))) + ")")
        self.i += 1
        return colour
