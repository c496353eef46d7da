"""The caption writer: a scene record -> one of many wordings, chosen by a seeded generator.

Every caption it writes is in the grammar of docs/SCENES.md and says only true things: all objects
of a shapes scene are named with their exact counts; a landscape names its major elements.
"""

from __future__ import annotations

import numpy as np

from sdgen.train.scenes.layout import LandscapeScene, Scene, ShapeGroup, ShapesScene
from sdgen.train.scenes.vocabulary import (
    ELEMENT_WORDINGS, GRADIENT_TEMPLATES, INVERSE_RELATION, NUMBER_WORDS, POSITION_WORDINGS,
    PREFIXES, REFLECTION_WORDINGS, RELATION_WORDINGS, SHAPE_PLURALS, SIZE_WORDS,
    SOLID_BACKGROUND_TEMPLATES, TIME_WORDINGS,
)

_SYNONYMS_OF_SIZE = {size: [w for w, s in SIZE_WORDS.items() if s == size] for size in ("small", "large")}


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _join(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _fix_articles(text: str) -> str:
    """'a' before a vowel sound becomes 'an' (and back), word by word."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def write_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for a scene record, worded at random from the grammar's phrase tables."""
    if isinstance(scene, ShapesScene):
        text = _shapes_caption(scene, rng)
    else:
        text = _landscape_caption(scene, rng)
    if rng.random() < 0.15:
        text = f"{_pick(rng, PREFIXES)} {text}"
    return _fix_articles(text)


def _colour_word(colour: str, rng: np.random.Generator) -> str:
    return "grey" if colour == "gray" and rng.random() < 0.2 else colour


def _group_phrase(group: ShapeGroup, rng: np.random.Generator) -> str:
    words = ["one" if rng.random() < 0.1 else "a"] if group.count == 1 else [NUMBER_WORDS[group.count]]
    if rng.random() < 0.5:
        words.append(_pick(rng, _SYNONYMS_OF_SIZE[group.size]))
    words.append(_colour_word(group.colour, rng))
    words.append(group.shape if group.count == 1 else SHAPE_PLURALS[group.shape])
    if group.position:
        words.append(_pick(rng, POSITION_WORDINGS[group.position]))
    return " ".join(words)


def _shapes_caption(scene: ShapesScene, rng: np.random.Generator) -> str:
    phrases = [_group_phrase(g, rng) for g in scene.groups]
    if scene.relation:
        relation = scene.relation
        if rng.random() < 0.5:  # say it from the other side: "B below A"
            phrases, relation = phrases[::-1], INVERSE_RELATION[relation]
        text = f"{phrases[0]} {_pick(rng, RELATION_WORDINGS[relation])} {phrases[1]}"
    else:
        text = _join([phrases[int(i)] for i in rng.permutation(len(phrases))])
    if rng.random() < 0.6:
        colours = [_colour_word(c, rng) for c in scene.background.colours]
        templates = SOLID_BACKGROUND_TEMPLATES if len(colours) == 1 else GRADIENT_TEMPLATES
        text += " " + _pick(rng, templates).format(*colours)
    return text


def _landscape_caption(scene: LandscapeScene, rng: np.random.Generator) -> str:
    elements = scene.elements
    majors = [e for e in ("mountains", "lake", "trees", "house", "city") if e in elements]
    phrases = {}
    for name in majors:
        key = "snowy mountains" if name == "mountains" and scene.snowy and rng.random() < 0.85 else name
        phrases[name] = _pick(rng, ELEMENT_WORDINGS[key])
    if "reflection" in elements and rng.random() < 0.35:
        mirrored = _pick(rng, [e for e in ("mountains", "city") if e in elements])
        if mirrored == "mountains":
            noun = "snowy mountains" if "snowy" in phrases["mountains"] else "mountains"
        else:
            noun = _pick(rng, ["city", "skyline"])
        phrases["lake"] = _pick(rng, REFLECTION_WORDINGS).format(noun)
        del phrases[mirrored]
    order = [phrases[k] for k in rng.permutation(list(phrases))]
    text = order[0]
    if len(order) > 1:
        connector = _pick(rng, ["with", "and", "by", "near", "beside"])
        if "mountain" in order[1] and rng.random() < 0.5:
            connector = "in front of"
        text += f" {connector} {_join(order[1:])}"
    if rng.random() < 0.9:
        text += " " + _pick(rng, TIME_WORDINGS[scene.time])
    extras = [_pick(rng, ELEMENT_WORDINGS[e]) for e in ("sun", "moon", "stars", "clouds")
              if e in elements and rng.random() < 0.6]
    if extras:
        text += (", with " if rng.random() < 0.5 else " with ") + _join(extras)
    return text
