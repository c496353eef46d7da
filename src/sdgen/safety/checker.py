"""Stable Diffusion's safety checker (CompVis, 2022; diffusers' `StableDiffusionSafetyChecker`), our own code.

The checker embeds an image with a CLIP ViT image tower plus `visual_projection`, takes the
cosine similarity to fixed concept embeddings (`concept_embeds`, 17 in the released checker) and
"special care" embeddings (3), and subtracts a per-concept threshold (`concept_embeds_weights`,
`special_care_embeds_weights`). Scores are rounded to 3 decimals in float32, as the reference
does. Once an image exceeds a special-care threshold, every later score of that image gets
+0.01 (the "special care" adjustment), so such images are flagged more readily. An image with
any concept score above 0 is flagged and replaced by a black image.

A diffusers folder keeps the weights in `safety_checker/` (a transformers CLIPConfig and
`model.safetensors` or `pytorch_model.bin`) and the image preprocessing in
`feature_extractor/preprocessor_config.json` (CLIPImageProcessor: resize the shorter side with
bicubic, centre crop, rescale to [0, 1], normalise with CLIP's mean and std).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdgen.checkpoints.diffusers_folder import allowed_roots, load_component_weights, read_json
from sdgen.checkpoints.errors import CheckpointError
from sdgen.models.clip_config import CLIPVisionConfig
from sdgen.models.clip import CLIPVisionModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_CARE_ADJUSTMENT = 0.01
_PIL_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


def _side(value: object, name: str, keys: tuple[str, ...]) -> tuple[int, ...]:
    """A size field as CLIPImageProcessor writes it: an int, or a dict with `keys`."""
    if isinstance(value, dict):
        if not all(type(value.get(k)) is int and value[k] > 0 for k in keys):
            raise ValueError(f"{name} must have positive integer {' and '.join(keys)}, got {value!r}")
        return tuple(value[k] for k in keys)
    if type(value) is not int or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return (value,) * len(keys)


@dataclass(frozen=True)
class ImagePreprocessing:
    """CLIPImageProcessor's steps (PIL backend) as `preprocessor_config.json` sets them."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3  # PIL's BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_config(cls, config: dict) -> ImagePreprocessing:
        """Read a transformers `preprocessor_config.json`; ValueError names a field we cannot honour."""
        (edge,) = _side(config.get("size", 224), "size", ("shortest_edge",))
        crop = _side(config.get("crop_size", 224), "crop_size", ("height", "width"))
        resample = config.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(f"resample must be a PIL filter number 0-5, got {resample!r}")
        mean, std = config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)
        for name, values in (("image_mean", mean), ("image_std", std)):
            if not isinstance(values, list | tuple) or len(values) != 3 or not all(isinstance(v, int | float) for v in values):
                raise ValueError(f"{name} must be three numbers, got {values!r}")
        if any(v == 0 for v in std):
            raise ValueError("image_std must not contain 0")
        flags = {k: bool(config.get(k, True)) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")}
        return cls(edge, crop[0], crop[1], resample, rescale_factor=float(config.get("rescale_factor", 1 / 255)),
                   mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), **flags)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(batch, 3, crop_height, crop_width) float32 pixels for the checker's image tower."""
        return torch.stack([self._one(image) for image in images])

    def _one(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.do_resize:
            # shorter side to `shortest_edge`, the longer one scaled and truncated (transformers' rule)
            short, long = sorted(image.size)
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if image.width <= image.height else (new_long, self.shortest_edge)
            image = image.resize(size, _PIL_RESAMPLE[self.resample])
        array = np.asarray(image)
        if self.do_center_crop:
            array = _center_crop(array, self.crop_height, self.crop_width)
        array = array.astype(np.float64)
        if self.do_rescale:
            array = array * self.rescale_factor
        array = array.astype(np.float32)
        if self.do_normalize:
            array = (array - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop (top-left rounded down); an image smaller than the crop is padded with zeros around it."""
    rows, cols = array.shape[:2]
    if rows < height or cols < width:
        padded = np.zeros((max(rows, height), max(cols, width), array.shape[2]), array.dtype)
        top, left = -(-(padded.shape[0] - rows) // 2), -(-(padded.shape[1] - cols) // 2)
        padded[top:top + rows, left:left + cols] = array
        array, rows, cols = padded, *padded.shape[:2]
    top, left = (rows - height) // 2, (cols - width) // 2
    return array[top:top + height, left:left + width]


@dataclass(frozen=True)
class SafetyReport:
    """One image's verdict: `nsfw` when a concept score is above 0; scores are cosine minus threshold."""

    nsfw: bool
    concept_scores: tuple[float, ...]
    special_scores: tuple[float, ...]

    @property
    def bad_concepts(self) -> list[int]:
        return [i for i, score in enumerate(self.concept_scores) if score > 0]

    @property
    def special_care(self) -> list[int]:
        return [i for i, score in enumerate(self.special_scores) if score > 0]


def _round3(x: torch.Tensor) -> torch.Tensor:
    """Round to 3 decimals in float32 (numpy's `round(x, 3)` on float32: scale, round half to even, unscale)."""
    return torch.round(x * 1000) / 1000


class SafetyChecker(nn.Module):
    """CLIP image tower + projection + concept embeddings and thresholds; parameter names as diffusers'."""

    def __init__(self, vision: CLIPVisionConfig, projection_dim: int, num_concepts: int = 17,
                 num_special: int = 3) -> None:
        super().__init__()
        vision = replace(vision, projection_dim=None)  # the projection sits at the top level in this file format
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(num_concepts, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(num_special, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(num_concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(num_special), requires_grad=False)

    @property
    def image_size(self) -> int:
        return self.vision_model.config.image_size

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> list[SafetyReport]:
        """Reports for preprocessed pixels (batch, 3, size, size)."""
        weight = self.visual_projection.weight
        embeds = self.visual_projection(self.vision_model(pixels.to(weight.device, weight.dtype)).pooled).float()
        embeds = F.normalize(embeds, dim=-1)
        # scores in float32 whatever the compute dtype, as the reference casts before scoring
        special_cos = embeds @ F.normalize(self.special_care_embeds.float(), dim=-1).T
        concept_cos = embeds @ F.normalize(self.concept_embeds.float(), dim=-1).T
        special_thresholds = self.special_care_embeds_weights.float()
        adjustment = torch.zeros(embeds.shape[0], device=embeds.device)
        special = torch.empty_like(special_cos)
        for k in range(special_cos.shape[1]):  # sequential: a hit raises the scores of the concepts after it
            special[:, k] = _round3(special_cos[:, k] - special_thresholds[k] + adjustment)
            adjustment = torch.where(special[:, k] > 0, SPECIAL_CARE_ADJUSTMENT, adjustment)
        concept = _round3(concept_cos - self.concept_embeds_weights.float() + adjustment[:, None])
        return [SafetyReport(bool((c > 0).any()), tuple(c.tolist()), tuple(s.tolist()))
                for c, s in zip(concept.cpu(), special.cpu())]


@dataclass
class SafetyFilter:
    """A loaded checker with its preprocessing: `screen(images)` blacks out the flagged ones."""

    model: SafetyChecker
    preprocess: ImagePreprocessing

    def check(self, images: list[Image.Image]) -> list[SafetyReport]:
        if not images:
            return []
        return self.model(self.preprocess(images))

    def screen(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """(images with the flagged ones replaced by black, nsfw flag per image)."""
        flags = [report.nsfw for report in self.check(images)]
        screened = [Image.new("RGB", image.size) if flagged else image for image, flagged in zip(images, flags)]
        return screened, flags


def _nested_vision_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released checkers name the tower `vision_model.vision_model.*`; transformers 5 saves `vision_model.*`."""
    nested = "vision_model.vision_model."
    return {f"vision_model.{key}" if key.startswith("vision_model.") and not key.startswith(nested) else key: tensor
            for key, tensor in state.items()}


def has_safety_checker(folder: str | Path) -> bool:
    """True when a model folder carries `safety_checker/` weights config."""
    return (Path(folder) / "safety_checker" / "config.json").is_file()


def load_safety_checker(folder: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> SafetyFilter:
    """Read `safety_checker/` and `feature_extractor/` of a diffusers model folder (weights mmapped)."""
    folder = Path(folder)
    checker_dir, extractor = folder / "safety_checker", folder / "feature_extractor" / "preprocessor_config.json"
    config = read_json(checker_dir / "config.json")
    try:
        vision = CLIPVisionConfig.from_transformers(config)
        projection_dim = config.get("projection_dim", 768)
        if type(projection_dim) is not int or projection_dim <= 0:
            raise ValueError(f"projection_dim must be a positive integer, got {projection_dim!r}")
        preprocess = ImagePreprocessing.from_config(read_json(extractor)) if extractor.exists() else ImagePreprocessing(
            vision.image_size, vision.image_size, vision.image_size)
    except (ValueError, TypeError) as error:
        raise CheckpointError(checker_dir, f"unsupported safety checker configuration ({error})",
                              "use a StableDiffusionSafetyChecker folder or pass --no-safety-checker") from None
    if (preprocess.crop_height, preprocess.crop_width) != (vision.image_size,) * 2:
        raise CheckpointError(extractor, f"crop size {preprocess.crop_height}x{preprocess.crop_width} does not match "
                              f"the checker's image size {vision.image_size}", "use the folder's own feature_extractor")
    state = _nested_vision_names(load_component_weights(checker_dir, "transformers", allowed_roots(folder))[0])
    counts = [tuple(state[name].shape)[:1] for name in ("concept_embeds", "special_care_embeds") if name in state]
    if len(counts) != 2:
        raise CheckpointError(checker_dir, "no concept_embeds / special_care_embeds in the weights",
                              "use a StableDiffusionSafetyChecker folder or pass --no-safety-checker")
    with torch.device("meta"):
        model = SafetyChecker(vision, projection_dim, counts[0][0], counts[1][0])
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        detail = str(error).splitlines()[-1].strip()[:200]
        raise CheckpointError(checker_dir, f"the safety checker weights do not fit its config ({detail})",
                              "download the folder again or pass --no-safety-checker") from None
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return SafetyFilter(model, preprocess)
