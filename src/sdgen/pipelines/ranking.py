"""Ranking images by CLIP similarity to their prompt (Radford et al. 2021; "CLIP score", Hessel et al. 2021).

The score of an image is the cosine similarity of its CLIP image embedding and the prompt's text
embedding (transformers' `CLIPModel` logits divided by exp(logit_scale)). The CLIP model is any
CLIP in the transformers folder layout (`config.json` + `model.safetensors`, e.g. ViT-B/32 or
ViT-L/14, optional `preprocessor_config.json` and tokenizer files) or, by default, the small CLIP
embedded with sdgen's own model (`data/embedded/clip/`, tokenizer in `data/embedded/tokenizer/`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from sdgen.checkpoints.errors import CheckpointError
from sdgen.checkpoints.formats import load_state_dict
from sdgen.errors import UserError
from sdgen.models.clip_config import CLIPConfig
from sdgen.models.clip import CLIPModel
from sdgen.models.clip_preprocess import CLIPImagePreprocess
from sdgen.models.tokenizer import CLIPTokenizer, TokenizerError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SCORE_KEY = "CLIP score"  # the infotext key of a ranked image


def default_clip_path() -> Path:
    """The small CLIP shipped with the embedded model."""
    from sdgen.pipelines.loading import embedded_model_path

    return embedded_model_path() / "clip"


@dataclass(frozen=True)
class Ranked:
    """One image's place: its index in the input, cosine similarity and CLIP logit."""

    index: int
    score: float
    logit: float


class CLIPRanker:
    """A CLIP model, its tokenizer and its image preprocessing."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, preprocess: CLIPImagePreprocess,
                 name: str = "CLIP") -> None:
        self.model, self.tokenizer, self.preprocess, self.name = model.eval(), tokenizer, preprocess, name

    @classmethod
    def from_folder(cls, path: str | Path | None = None, *, device: str | torch.device = "cpu") -> "CLIPRanker":
        """Load a transformers-layout CLIP folder (None: the embedded small CLIP) through the safe readers."""
        from sdgen.pipelines.loading import build_module

        folder = Path(path) if path is not None else default_clip_path()
        if not (folder / "config.json").is_file():
            hint = ("the embedded CLIP is not installed; pass --clip-model FOLDER" if path is None
                    else "pass a CLIP folder with config.json and model.safetensors (transformers layout)")
            raise UserError(f"{folder}: no CLIP config.json; {hint}")
        try:
            raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            config = CLIPConfig.from_transformers(raw)
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as error:
            raise CheckpointError(folder / "config.json", f"not a CLIPModel config ({error})",
                                  "pass a CLIP model folder (model_type 'clip')") from None
        weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
        if weights is None:
            raise CheckpointError(folder, "no model.safetensors or pytorch_model.bin", "pass a complete CLIP folder")
        state, _ = load_state_dict(weights)
        model = build_module(weights, "CLIP", lambda: CLIPModel(config), state, torch.device(device), torch.float32)
        return cls(model, _tokenizer(folder, config.text.max_positions), _preprocess(folder, config.vision.image_size),
                   name=folder.name if folder.name != "clip" else folder.parent.name + "/clip")

    def embed_text(self, prompt: str) -> torch.Tensor:
        """The prompt's unit-length text embedding (1, projection_dim)."""
        ids = self.tokenizer([prompt], max_length=self.model.config.text.max_positions)
        with torch.inference_mode():
            return F.normalize(self.model.encode_text(ids.to(self._device)).text_embeds.float(), dim=-1)

    def embed_images(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """Unit-length image embeddings (n, projection_dim), preprocessed as CLIPImageProcessor does."""
        rows = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start:start + batch_size]).to(self._device)
            with torch.inference_mode():
                rows.append(F.normalize(self.model.encode_image(pixels).image_embeds.float(), dim=-1))
        return torch.cat(rows)

    def scores(self, images: list[Image.Image], prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine similarities (n,), logits (n,) = exp(logit_scale) * cosine, transformers' logits_per_image)."""
        if not images:
            return torch.zeros(0), torch.zeros(0)
        cosine = (self.embed_images(images) @ self.embed_text(prompt).T)[:, 0]
        return cosine, cosine * self.model.logit_scale.detach().float().exp()

    def rank(self, images: list[Image.Image], prompt: str) -> list[Ranked]:
        """The images best first (ties keep their order)."""
        cosine, logits = self.scores(images, prompt)
        order = sorted(range(len(images)), key=lambda i: -float(cosine[i]))
        return [Ranked(i, float(cosine[i]), float(logits[i])) for i in order]

    @property
    def _device(self) -> torch.device:
        return self.model.logit_scale.device


def _tokenizer(folder: Path, max_positions: int) -> CLIPTokenizer:
    """The folder's tokenizer files, else the embedded model's sibling `tokenizer/`, else OpenAI's vocabulary."""
    for candidate in (folder, folder.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.json").is_file():
            try:
                return CLIPTokenizer.from_folder(candidate)
            except TokenizerError as error:
                raise CheckpointError(candidate, str(error), "pass a CLIP folder with a readable tokenizer") from None
    return CLIPTokenizer.default()


def _preprocess(folder: Path, image_size: int) -> CLIPImagePreprocess:
    """The folder's preprocessor_config.json (the embedded CLIP's says mean and std 0.5), else CLIP's
    defaults at the tower's image size."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return CLIPImagePreprocess.for_image_size(image_size)
    try:
        return CLIPImagePreprocess.from_config(json.loads(file.read_text(encoding="utf-8")), image_size)
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(file, f"unreadable preprocessor config ({error})", "fix or remove the file") from None


def check_keep(keep: int | None) -> None:
    """UserError unless `keep` is None (keep all) or a positive count."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise UserError(f"--keep must be a positive number of images, got {keep!r}")


def add_score(infotext: str, score: float) -> str:
    """The infotext with `CLIP score: x` appended to its parameter line (A1111 readers keep unknown keys)."""
    return f"{infotext}, {SCORE_KEY}: {score:.4f}"


def rank_result(result, ranker: CLIPRanker, out: Path, keep: int | None = None, **save_options) -> list[str]:
    """Score a GenerationResult's images against its prompt, save them all with their score in the
    infotext (the best `keep` in `out`, the others in `out/rejected`), and return report lines best first."""
    from sdgen.pipelines.naming import save_images

    check_keep(keep)
    ranked = ranker.rank(result.images, result.request.prompt)
    keep = len(ranked) if keep is None else keep
    result.infotexts = [add_score(text, next(r.score for r in ranked if r.index == i))
                        for i, text in enumerate(result.infotexts)]
    lines = []
    for place, group in ((out, ranked[:keep]), (out / "rejected", ranked[keep:])):
        if not group:
            continue
        paths = save_images([result.images[r.index] for r in group], [result.infotexts[r.index] for r in group],
                            place, seeds=[result.seeds[r.index] for r in group], request=result.request,
                            **save_options)
        for r, path in zip(group, paths):
            result.paths.append(path)
            lines.append(f"{r.score:.4f}  {path}" + ("" if place == out else "  (rejected)"))
    return lines


def rank_folder(folder: str | Path, prompt: str, ranker: CLIPRanker, keep: int | None = None) -> list[str]:
    """Report lines `score  path` for the images of a folder (PNG, JPEG, WEBP), best first."""
    from sdgen.pipelines.images import read_image

    check_keep(keep)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder}: no PNG, JPEG or WEBP images to rank")
    images = []
    for file in files:
        with read_image(file) as image:
            images.append(image.copy())
    ranked = ranker.rank(images, prompt)
    return [f"{r.score:.4f}  {files[r.index]}" for r in ranked[:keep]]

