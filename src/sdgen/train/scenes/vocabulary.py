"""Everything the procedural scenes can contain and every phrase captions may use to say it.

One table per idea, shared by the renderer, the caption writer, the parser and the checker, so the
four can never disagree. docs/SCENES.md describes the same grammar for users.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------
# Shapes family
# ---------------------------------------------------------------------------------------------

# Pairwise RGB distances are at least ~100, so nearest-colour segmentation separates them at 64x64.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (255, 145, 0),
    "yellow": (250, 230, 50),
    "green": (40, 170, 60),
    "blue": (30, 90, 225),
    "purple": (145, 45, 200),
    "pink": (250, 135, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "brown": (125, 70, 25),
    "gray": (140, 140, 140),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "ring", "diamond", "cross")
SHAPE_PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES} | {"cross": "crosses"}
# Width over height of each shape's bounding box; shapes are drawn upright, never rotated.
SHAPE_ASPECT: dict[str, float] = {
    "circle": 1.0, "square": 1.0, "triangle": 1.12, "star": 1.05,
    "heart": 1.1, "ring": 1.0, "diamond": 0.75, "cross": 1.0,
}

SIZES: tuple[str, ...] = ("small", "large")
# Longer side of an object's bounding box as a fraction of the image side; the checker splits at
# the midpoint.
SIZE_EXTENT: dict[str, float] = {"small": 0.2, "large": 0.36}
SIZE_SPLIT = 0.28

# Centres of the nine cells of a 3x3 grid (x, y), in fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2), "top": (0.5, 0.2), "top right": (0.8, 0.2),
    "left": (0.2, 0.5), "center": (0.5, 0.5), "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8), "bottom": (0.5, 0.8), "bottom right": (0.8, 0.8),
}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
}

# Vertical gradients, first colour at the top. Object colours close to any colour along a gradient
# are never drawn on it (GRADIENT_CLEARANCE), so the background never merges with an object.
GRADIENTS: tuple[tuple[str, str], ...] = (
    ("blue", "purple"), ("orange", "pink"), ("yellow", "green"), ("black", "blue"),
    ("purple", "pink"), ("blue", "white"), ("red", "yellow"), ("black", "purple"),
    ("blue", "green"), ("yellow", "pink"),
)
OBJECT_CONTRAST = 100.0  # least RGB distance between an object and a plain background
GRADIENT_CLEARANCE = 90.0  # least RGB distance between an object and any colour of a gradient

# ---------------------------------------------------------------------------------------------
# Landscapes family
# ---------------------------------------------------------------------------------------------

TIMES: tuple[str, ...] = ("day", "sunset", "night")
ELEMENTS: tuple[str, ...] = (
    "mountains", "snow", "lake", "reflection", "trees", "house", "city",
    "sun", "moon", "stars", "clouds",
)
MAJOR_ELEMENTS: tuple[str, ...] = ("mountains", "lake", "trees", "house", "city")

# Sky gradients per time of day: (top, horizon).
SKY: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "day": ((80, 150, 230), (165, 205, 245)),
    "sunset": ((230, 105, 135), (250, 170, 80)),
    "night": ((8, 12, 40), (25, 35, 85)),
}
WATER: dict[str, tuple[int, int, int]] = {
    "day": (45, 100, 195), "sunset": (60, 80, 170), "night": (20, 35, 90),
}
REFLECTION_MIX = 0.25  # share of the mirrored scene in a lake pixel
LANDSCAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "mountain": (115, 105, 130),
    "snow": (250, 250, 255),
    "grass": (85, 155, 65),
    "tree": (30, 95, 50),
    "trunk": (100, 65, 35),
    "wall": (230, 205, 160),
    "roof": (175, 45, 40),
    "door": (90, 55, 30),
    "building": (55, 60, 75),
    "window_cyan": (80, 230, 240),
    "window_warm": (255, 205, 90),
    "sun": (255, 240, 150),
    "moon": (240, 235, 200),
    "star": (255, 255, 235),
    "cloud": (250, 250, 252),
}
# Rows fixed in fractions of the image side (37/64 and 44/64, whole rows at 64 and 128 pixels).
HORIZON = 37 / 64
LAKE_TOP = 44 / 64

# ---------------------------------------------------------------------------------------------
# Held-out combinations: never drawn by the training sampler, used by `sdgen eval`
# ---------------------------------------------------------------------------------------------

HELDOUT_COLOUR_SHAPES: frozenset[tuple[str, str]] = frozenset({
    ("purple", "heart"), ("yellow", "triangle"), ("orange", "ring"),
    ("pink", "square"), ("green", "star"), ("blue", "diamond"),
})
# (shape, relation, shape); the converse (triangle below circle) is held out with each.
_HELDOUT_RELATION_BASE = (
    ("circle", "above", "triangle"), ("star", "left of", "heart"), ("square", "below", "ring"),
)
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {t for a, r, b in _HELDOUT_RELATION_BASE for t in ((a, r, b), (b, INVERSE_RELATION[r], a))}
)
# A landscape is held out when its elements plus its time of day contain one of these sets.
HELDOUT_LANDSCAPES: tuple[frozenset[str], ...] = (
    frozenset({"city", "night", "snow"}),
    frozenset({"house", "sunset", "lake"}),
    frozenset({"trees", "night", "lake"}),
)

# ---------------------------------------------------------------------------------------------
# Wordings: the writer picks among them, the parser accepts all of them
# ---------------------------------------------------------------------------------------------

PREFIXES: tuple[str, ...] = ("a picture of", "an image of", "a drawing of")
COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
SIZE_WORDS: dict[str, str] = {"small": "small", "little": "small", "large": "large", "big": "large"}
COLOUR_WORDS: dict[str, str] = {name: name for name in COLOURS} | {"grey": "gray"}
SHAPE_WORDS: dict[str, str] = {s: s for s in SHAPES} | {p: s for s, p in SHAPE_PLURALS.items()}

POSITION_WORDINGS: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
POSITION_SYNONYMS: dict[str, str] = {"centre": "center", "upper": "top", "lower": "bottom"}
RELATION_WORDINGS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
SOLID_BACKGROUND_TEMPLATES: tuple[str, ...] = (
    "on a {0} background", "on {0}", "against a {0} background",
)
GRADIENT_TEMPLATES: tuple[str, ...] = (
    "on a {0} to {1} gradient", "on a gradient from {0} to {1}", "against a {0} to {1} gradient",
)

# Landscape phrases, each naming the claims it makes. Longest match wins when parsing.
LANDSCAPE_PHRASES: dict[str, frozenset[str]] = {
    phrase: frozenset(claims.split())
    for claims, phrases in {
        "mountains": "mountains|mountain|mountain range|peaks|mountain peaks",
        "snow mountains": "snowy|snow capped|snowcapped|snow",
        "lake": "lake|pond",
        "reflection lake": "reflection|reflecting|reflected",
        "trees": "trees|tree|forest|pine trees|pines",
        "house": "house|cabin|cottage",
        "city": "city|cityscape|skyline|city skyline|skyscrapers|buildings",
        "sun": "sun",
        "sun day": "sunny",
        "moon": "moon",
        "moon night": "moonlit",
        "stars": "stars|starry",
        "stars night": "starry sky",
        "clouds": "clouds|cloud|cloudy",
        "day": "day|daytime|daylight|blue sky|clear day",
        "sunset": "sunset|dusk|orange sky|sunset sky",
        "night": "night|nighttime|night sky|dark sky",
    }.items()
    for phrase in phrases.split("|")
}
ELEMENT_WORDINGS: dict[str, tuple[str, ...]] = {
    "mountains": ("mountains", "the mountains", "a mountain range", "mountain peaks"),
    "snowy mountains": ("snowy mountains", "snow-capped mountains", "snowy peaks",
                        "mountains with snow"),
    "lake": ("a lake", "a tranquil lake", "a calm lake", "a still lake"),
    "trees": ("trees", "pine trees", "a forest", "some trees", "a few trees"),
    "house": ("a house", "a small house", "a cabin", "a cottage"),
    "city": ("a city", "a cityscape", "a futuristic cityscape", "a city skyline",
             "a futuristic city", "skyscrapers"),
    "sun": ("the sun", "a bright sun"),
    "moon": ("the moon", "a full moon", "a bright moon"),
    "stars": ("stars", "many stars", "twinkling stars"),
    "clouds": ("clouds", "white clouds", "a few clouds", "fluffy clouds"),
}
# A lake that mirrors mountains or a city may be described by its reflection.
REFLECTION_WORDINGS: tuple[str, ...] = (
    "a lake reflecting the {0}", "{0} reflected in a lake", "a lake with a reflection of the {0}",
)
TIME_WORDINGS: dict[str, tuple[str, ...]] = {
    "day": ("under a blue sky", "during the day", "on a clear day", "in daylight"),
    "sunset": ("at sunset", "at dusk", "under an orange sky", "under a sunset sky"),
    "night": ("at night", "under a night sky", "under a dark sky", "at nighttime"),
}
LANDSCAPE_CONNECTORS: tuple[str, ...] = ("with", "and", "by", "near", "beside", "in front of")
# Words that carry no claim in a landscape caption; any other unknown word is an error.
LANDSCAPE_FILLERS: frozenset[str] = frozenset(
    "a an the with and by near beside in front of some few many under above over behind at on during "
    "sky range tranquil calm still peaceful quiet beautiful small little bright full shining "
    "twinkling fluffy white blue orange dark clear futuristic pine capped".split()
)


def words_of(text: str) -> list[str]:
    """Lower-case words and commas of a caption; hyphens split words ("snow-capped")."""
    text = text.lower().replace("-", " ").replace("centre", "center")
    return re.findall(r"[a-z]+|,", text.rstrip(" .!"))


def vocabulary_words() -> list[str]:
    """Every word (and the comma) a caption in the grammar can use, sorted; for building a BPE vocabulary."""
    texts = [*PREFIXES, *COUNT_WORDS, *SIZE_WORDS, *COLOUR_WORDS, *SHAPE_WORDS, *POSITION_SYNONYMS,
             "corner side and , background gradient from to plain", *LANDSCAPE_PHRASES,
             *LANDSCAPE_FILLERS, *LANDSCAPE_CONNECTORS]
    for table in (POSITION_WORDINGS, RELATION_WORDINGS, ELEMENT_WORDINGS, TIME_WORDINGS):
        texts += [w for wordings in table.values() for w in wordings]
    texts += [*SOLID_BACKGROUND_TEMPLATES, *GRADIENT_TEMPLATES, *REFLECTION_WORDINGS]
    return sorted({w for text in texts for w in words_of(text.replace("{0}", "").replace("{1}", ""))})
