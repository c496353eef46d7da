"""The generation request every front end builds (CLI, Python API, HTTP API) and its validation."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields, replace

from sdgen.errors import UserError

MAX_SEED = 4294967294  # AUTOMATIC1111 draws random seeds in [0, 4294967294)


class RequestError(UserError, ValueError):
    """A request field with a value we cannot honour; the message names the field."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before any allocation (a server may lower them)."""

    max_side: int = 4096
    max_pixels: int = 2048 * 2048
    max_steps: int = 500
    max_images: int = 1000
    max_batch_size: int = 64
    max_prompt_chars: int = 1_000_000


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines the pixels of a txt2img run (model chosen separately)."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    sampler: str = "Euler a"
    scheduler: str = "automatic"
    cfg_scale: float = 7.0
    width: int | None = None  # None: the model's native size
    height: int | None = None
    n: int = 1
    batch_size: int = 1
    clip_skip: int = 1
    extra: dict = field(default_factory=dict)

    def with_seed(self) -> "GenerationRequest":
        """Resolve `seed=-1` to a concrete random seed so it can be recorded and replayed."""
        if self.seed == -1:
            return replace(self, seed=secrets.randbelow(MAX_SEED))
        return self

    def validate(self, limits: Limits = Limits()) -> None:
        """Raise RequestError naming the first bad field; allocates nothing."""
        check_text("prompt", self.prompt, limits)
        check_text("negative_prompt", self.negative_prompt, limits)
        if not isinstance(self.seed, int) or not (-1 <= self.seed <= 2**63 - 1):
            raise RequestError(f"seed must be -1 (random) or a non-negative integer, got {self.seed!r}")
        check_int_range("steps", self.steps, 1, limits.max_steps)
        check_int_range("n", self.n, 1, limits.max_images)
        check_int_range("batch_size", self.batch_size, 1, limits.max_batch_size)
        check_int_range("clip_skip", self.clip_skip, 1, 12)
        check_float_range("cfg_scale", self.cfg_scale, 0.0, 100.0)
        if self.width is not None or self.height is not None:
            check_size(self.width, self.height, limits)


def check_text(name: str, value: object, limits: Limits) -> None:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(f"{name} is {len(value)} characters long; the limit is {limits.max_prompt_chars}")


def check_int_range(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}")


def check_float_range(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}")


def check_size(width: object, height: object, limits: Limits) -> None:
    """Width and height: positive multiples of 8 within the side and pixel-count limits."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name} must be an integer multiple of 8, got {value!r}")
        if value <= 0 or value % 8:
            raise RequestError(f"{name} must be a positive multiple of 8, got {value} (try {max(8, round(value / 8) * 8)})")
        if value > limits.max_side:
            raise RequestError(f"{name} {value} is over the limit of {limits.max_side} pixels")
    if width * height > limits.max_pixels:
        raise RequestError(
            f"{width}x{height} is {width * height} pixels, over the limit of {limits.max_pixels}; "
            "generate smaller and upscale"
        )


def request_fields() -> list[str]:
    return [f.name for f in fields(GenerationRequest)]
