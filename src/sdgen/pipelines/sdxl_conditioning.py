"""SDXL's conditioning (Podell et al. 2023): two text encoders, a pooled text embedding and size ids.

The U-Net's cross-attention context is the penultimate hidden states of every text encoder,
concatenated along the width (CLIP ViT-L 768 + OpenCLIP ViT-bigG 1280 = 2048 for the base model,
bigG alone for the refiner). Its "added conditioning" is the last encoder's projected pooled
output (`text_embeds`) plus the micro-conditioning numbers (`time_ids`), each of which the U-Net
embeds with its own sinusoid:
- base:    original height, width, crop top, left, target height, width (6 numbers);
- refiner: original height, width, crop top, left, aesthetic score (5 numbers).
AUTOMATIC1111 1.10 (`sd_models_xl.get_learned_conditioning`) passes the generation size as both
original and target size, crop (0, 0) and aesthetic scores 6 (prompt) / 2.5 (negative prompt);
diffusers' SDXL pipelines have the same defaults.

Prompts are written in A1111's prompt language, as its SDXL embedders read them
(`sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords`, `sd_hijack_open_clip.
FrozenOpenCLIPEmbedder2WithCustomWords`): each encoder runs its own `PromptEncoder` (emphasis,
BREAK, 75-token chunks, textual inversions by their "clip_l" / "clip_g" vectors), so the emphasis
mean restore is per encoder; the chunks' contexts are concatenated along the sequence axis, and
the pooled embedding is the last encoder's of the first chunk, without emphasis (`zs[0].pooled`).
Prompt and negative prompt get the same chunk count by appending the empty prompt's encoding
(A1111's "pad prompt/negative prompt", whose `cond_stage_model_empty_prompt` is the encoded "",
also after a zeroed negative prompt). Diffusers cuts prompts at 77 tokens and knows no emphasis;
for prompts of up to 75 tokens without emphasis the two agree bit for bit.

An empty negative prompt: A1111 1.10 zeroes its embeddings (`force_zero_embeddings` when every
negative prompt of the batch is ""), and so do diffusers' SDXL pipelines when no negative prompt
is given (`force_zeros_for_empty_prompt`); `zero_negative=False` encodes the empty string instead,
as diffusers does when it is passed `negative_prompt=""`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from sdgen.models.clip import CLIPTextModel
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.pipelines.request import RequestError
from sdgen.prompting.embeddings import Embedding, EmbeddingLibrary
from sdgen.prompting.encode import CHUNK_LENGTH, PromptEncoder, pad_to_same_length
from sdgen.prompting.parse import extract_extra_networks

BASE_IDS, REFINER_IDS = 6, 5  # time ids of the base U-Net and of the refiner's
CHUNK_TOKENS = CHUNK_LENGTH + 2  # one chunk's context rows: start, 75 tokens, end
Embeddings = EmbeddingLibrary | Sequence[Embedding] | None


@dataclass(frozen=True)
class SDXLOptions:
    """SDXL micro-conditioning and the empty-negative-prompt policy; sizes are (width, height), None = the generation's."""

    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)  # (top, left) of the crop the model is told the image was cut from
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0  # refiner only: the score the prompt is conditioned on
    negative_aesthetic_score: float = 2.5  # refiner only: the score of the negative prompt
    zero_negative: bool = True  # an empty negative prompt gives zero embeddings (A1111 1.10, diffusers)

    def validate(self) -> None:
        """RequestError naming the first bad field."""
        for name in ("original_size", "target_size"):
            size = getattr(self, name)
            if size is not None and not _positive_pair(size):
                raise RequestError(f"{name} must be (width, height) in pixels, two positive integers, got {size!r}")
        if not _pair(self.crop) or min(self.crop) < 0:
            raise RequestError(f"crop must be (top, left), two non-negative integers, got {self.crop!r}")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number (the refiner was trained on 0 to 10), got {value!r}")
        if not isinstance(self.zero_negative, bool):
            raise RequestError(f"zero_negative must be true or false, got {self.zero_negative!r}")

    def with_fields(self, **changes) -> "SDXLOptions":
        """A copy with `changes` applied (None values ignored, lists taken as tuples), validated."""
        changes = {key: tuple(value) if isinstance(value, list) else value
                   for key, value in changes.items() if value is not None}
        options = replace(self, **changes)
        options.validate()
        return options

    def parameters(self) -> dict[str, object]:
        """Infotext keys for the settings that differ from the defaults (A1111 keeps them as settings)."""
        default, out = SDXLOptions(), {}
        names = {"original_size": "SDXL original size", "crop": "SDXL crop", "target_size": "SDXL target size",
                 "aesthetic_score": "Aesthetic score", "negative_aesthetic_score": "Negative aesthetic score"}
        for name, key in names.items():
            value = getattr(self, name)
            if value != getattr(default, name):
                out[key] = f"{value[0]}x{value[1]}" if name.endswith("size") else (
                    f"{value[0]},{value[1]}" if name == "crop" else value)
        if not self.zero_negative:
            out["SDXL empty negative"] = "encoded"
        return out


OPTION_NAMES = tuple(f.name for f in fields(SDXLOptions))


def _pair(value: object) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _positive_pair(value: object) -> bool:
    return _pair(value) and min(value) > 0


def time_ids(options: SDXLOptions, width: int, height: int, count: int, *, negative: bool) -> torch.Tensor:
    """(1, count) micro-conditioning numbers in the U-Net's order (heights before widths)."""
    original_w, original_h = options.original_size or (width, height)
    target_w, target_h = options.target_size or (width, height)
    top, left = options.crop
    if count == BASE_IDS:
        values = [original_h, original_w, top, left, target_h, target_w]
    elif count == REFINER_IDS:
        score = options.negative_aesthetic_score if negative else options.aesthetic_score
        values = [original_h, original_w, top, left, score]
    else:
        raise ValueError(f"the U-Net takes {count} size ids; SDXL base takes {BASE_IDS}, the refiner {REFINER_IDS}")
    return torch.tensor([values], dtype=torch.float32)


EMBEDDING_KEYS = ("clip_l", "clip_g")  # SDXL embedding files: vectors of the ViT-L and of the bigG encoder


class SDXLTextEncoder:
    """The text side of an SDXL model: one tokenizer per encoder, A1111's prompt language per
    encoder, penultimate states concatenated along the width, pooled projection of the last encoder."""

    def __init__(self, encoders: Sequence[CLIPTextModel], tokenizers: Sequence[CLIPTokenizer]) -> None:
        if not 1 <= len(encoders) <= len(EMBEDDING_KEYS) or len(encoders) != len(tokenizers):
            raise ValueError("SDXL needs one or two text encoders, each with its tokenizer")
        if encoders[-1].text_projection is None:
            raise ValueError("SDXL's last text encoder needs a text projection (its pooled embedding)")
        self.encoders, self.tokenizers = list(encoders), list(tokenizers)
        self._prompt_encoders: list[PromptEncoder] | None = None
        self._embeddings: Embeddings = None

    @property
    def width(self) -> int:
        """Width of the context (the U-Net's cross_attention_dim)."""
        return sum(encoder.config.hidden_size for encoder in self.encoders)

    @property
    def pooled_width(self) -> int:
        return self.encoders[-1].config.projection_dim

    def prompt_encoders(self, embeddings: Embeddings = None) -> list[PromptEncoder]:
        """One PromptEncoder per text encoder (the refiner's bigG reads "clip_g" vectors), kept
        until `embeddings` changes. SDXL takes the raw penultimate layer; A1111 ignores clip skip."""
        if self._prompt_encoders is None or embeddings is not self._embeddings:
            keys = EMBEDDING_KEYS[len(EMBEDDING_KEYS) - len(self.encoders):]
            self._prompt_encoders = [
                PromptEncoder(tokenizer, encoder, embeddings, embedding_key=key, layer="penultimate")
                for encoder, tokenizer, key in zip(self.encoders, self.tokenizers, keys)]
            self._embeddings = embeddings
        return self._prompt_encoders

    def encode(self, text: str, embeddings: Embeddings = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (1, 77 * chunks, width), pooled text_embeds (1, projection_dim)) of one prompt;
        `<lora:...>` tags are not encoded."""
        text = extract_extra_networks(text)[0]
        contexts, pooled = [], None
        for encoder in self.prompt_encoders(embeddings):
            context, pooled = encoder.encode_with_pooled([text])
            contexts.append(context)
        return torch.cat(contexts, dim=-1), pooled

    def encode_pair(self, prompt: str, negative_prompt: str | None, zero_negative: bool, embeddings: Embeddings = None
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """Encodings of the prompt and (None: no guidance) the negative prompt, contexts padded to
        the same chunk count; an empty negative prompt gives zeros when `zero_negative` is set."""
        cond = self.encode(prompt, embeddings)
        if negative_prompt is None:
            return cond, None
        if extract_extra_networks(negative_prompt)[0] == "" and zero_negative:
            uncond = torch.zeros_like(cond[0][:, :CHUNK_TOKENS]), torch.zeros_like(cond[1])
        else:
            uncond = self.encode(negative_prompt, embeddings)
        if cond[0].shape[1] == uncond[0].shape[1]:
            return cond, uncond
        context, negative_context = pad_to_same_length(cond[0], uncond[0], self.encode("", embeddings)[0])
        return (context, cond[1]), (negative_context, uncond[1])


def parse_size(text: str) -> tuple[int, int]:
    """"1024x768" -> (1024, 768) (width, height), for `--original-size`."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected WIDTHxHEIGHT such as 1024x1024, got {text!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {text!r}")
    return width, height


def parse_crop(text: str) -> tuple[int, int]:
    """"64,0" -> (64, 0) (top, left), for `--crop`."""
    try:
        top, left = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected TOP,LEFT in pixels such as 0,0, got {text!r}") from None
    if top < 0 or left < 0:
        raise ValueError(f"crop offsets must not be negative, got {text!r}")
    return top, left
