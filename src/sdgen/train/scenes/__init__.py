"""Procedural captioned scenes (shapes and landscapes) for training and evaluating the embedded model.

See docs/SCENES.md for the caption grammar and the held-out combinations.
"""

from sdgen.train.scenes.captions import write_caption
from sdgen.train.scenes.checker import ClaimResult, accuracy_by_category, check, check_caption
from sdgen.train.scenes.dataset import SceneBatch, SceneDataset, heldout_prompts
from sdgen.train.scenes.layout import LandscapeScene, Scene, ShapesScene, is_heldout, sample_scene
from sdgen.train.scenes.parse import CATEGORIES, CaptionError, Claim, Target, claims_heldout, parse_caption
from sdgen.train.scenes.render import render
from sdgen.train.scenes.vocabulary import vocabulary_words

__all__ = [
    "CATEGORIES", "CaptionError", "Claim", "ClaimResult", "LandscapeScene", "Scene", "SceneBatch",
    "SceneDataset", "ShapesScene", "Target", "accuracy_by_category", "check", "check_caption",
    "claims_heldout", "heldout_prompts", "is_heldout", "parse_caption", "render", "sample_scene",
    "vocabulary_words", "write_caption",
]
