"""The generation request every front end builds (CLI, Python API, HTTP API) and its validation."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields, replace

from PIL import Image

from sdgen.errors import UserError

MAX_SEED = 4294967294  # AUTOMATIC1111 draws random seeds in [0, 4294967294)
# A1111's hires-fix upscalers that need no extra model: latent interpolation modes, then pixel resamplers.
HIRES_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                   "Latent (nearest)", "Latent (nearest-exact)", "None", "Lanczos", "Nearest")
RESIZE_MODES = ("stretch", "crop", "fill")  # A1111's resize modes 0, 1, 2
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3


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
    subseed: int = -1  # variation seed; -1 picks a random one
    subseed_strength: float = 0.0  # 0 = no variation; A1111 slerps the seed's and subseed's noises
    hires_scale: float | None = None  # hires fix: None = off, else the second pass is this much larger
    hires_strength: float = 0.7  # denoising strength of the second pass
    hires_steps: int = 0  # second-pass steps; 0 = the same as `steps`
    hires_upscaler: str = "Latent"  # one of HIRES_UPSCALERS

    def with_seed(self) -> "GenerationRequest":
        """Resolve `seed=-1` (and `subseed=-1`) to concrete random seeds so they can be recorded and replayed."""
        request = self
        if request.seed == -1:
            request = replace(request, seed=secrets.randbelow(MAX_SEED))
        if request.subseed == -1:
            request = replace(request, subseed=secrets.randbelow(MAX_SEED))
        return request

    def image_seeds(self) -> tuple[list[int], list[int]]:
        """(seeds, subseeds) per image as A1111: without variation seed + i; with it one seed, subseed + i."""
        seeds = [self.seed + (0 if self.subseed_strength else i) for i in range(self.n)]
        return seeds, [self.subseed + i for i in range(self.n)]

    @property
    def hires_size(self) -> tuple[int, int] | None:
        """(width, height) of the hires-fix pass: the base size times hires_scale, down to multiples of 8."""
        if self.hires_scale is None or self.width is None or self.height is None:
            return None
        return int(self.width * self.hires_scale) // 8 * 8, int(self.height * self.hires_scale) // 8 * 8

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
            # a missing side becomes the model's native size later; the given one is checked now
            check_size(8 if self.width is None else self.width, 8 if self.height is None else self.height, limits)
        from sdgen.diffusion.registry import resolve_sampler

        resolve_sampler(self.sampler, self.scheduler)  # unknown names: the error lists the valid ones
        if not isinstance(self.subseed, int) or isinstance(self.subseed, bool) or not -1 <= self.subseed <= 2**63 - 1:
            raise RequestError(f"subseed must be -1 (random) or a non-negative integer, got {self.subseed!r}")
        check_float_range("subseed_strength", self.subseed_strength, 0.0, 1.0)
        if self.hires_scale is not None:
            check_float_range("hires_scale", self.hires_scale, 1.0, 8.0)
            check_float_range("hires_strength", self.hires_strength, 0.0, 1.0)
            check_int_range("hires_steps", self.hires_steps, 0, limits.max_steps)
            if self.hires_upscaler not in HIRES_UPSCALERS:
                raise RequestError(f"hires_upscaler must be one of {', '.join(HIRES_UPSCALERS)}, "
                                   f"got {self.hires_upscaler!r}")
            if self.hires_size is not None:
                try:
                    check_size(*self.hires_size, limits)
                except RequestError as error:
                    raise RequestError(f"hires_scale: the second pass {error}") from None


@dataclass(frozen=True)
class Img2ImgRequest(GenerationRequest):
    """An img2img / inpainting run: a GenerationRequest plus the input image, strength and mask settings.

    width / height None: the input image's size rounded down to multiples of 8. `resize_mode`
    fits the input to that size as A1111 does: "stretch" (just resize), "crop" (scale to cover,
    centre crop), "fill" (scale to fit, fill the bands by stretching the edge rows / columns).
    """

    init_image: Image.Image | None = None
    strength: float = 0.75  # denoising strength: 0 returns the input, 1 ignores it
    resize_mode: str = "stretch"  # one of RESIZE_MODES
    mask: Image.Image | None = None  # white = repaint; the input image's size
    mask_blur: int = 4  # Gaussian blur radius (pixels) of the mask edge
    mask_invert: bool = False  # repaint the black part instead
    masked_content: str = "original"  # what the masked area starts from: one of MASKED_CONTENT
    only_masked: bool = False  # A1111's "Inpaint area: Only masked": work on a crop around the mask
    only_masked_padding: int = 32  # pixels around the mask kept in that crop
    inpaint_blend: bool = True  # keep the unmasked latents at every step (also with inpainting models)

    def resolved_size(self) -> tuple[int, int]:
        """(width, height) of the generation: the request's, else the input's rounded down to multiples of 8."""
        if self.width is not None and self.height is not None:
            return self.width, self.height
        image = self.init_image
        width = self.width or max(8, image.width // 8 * 8)
        height = self.height or max(8, image.height // 8 * 8)
        return width, height

    def validate(self, limits: Limits = Limits()) -> None:
        """GenerationRequest's checks plus the image, mask and strength; RequestError names the field."""
        if not isinstance(self.init_image, Image.Image):
            raise RequestError("init_image must be an image (PNG, JPEG or WEBP), got "
                               f"{type(self.init_image).__name__}")
        if self.width is None or self.height is None:
            width, height = self.resolved_size()
            try:
                check_size(width, height, limits)
            except RequestError as error:
                raise RequestError(f"init_image is {self.init_image.width}x{self.init_image.height}; {error}; "
                                   "pass a smaller width and height") from None
        super().validate(limits)
        check_float_range("strength", self.strength, 0.0, 1.0)
        if self.resize_mode not in RESIZE_MODES:
            raise RequestError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.mask is not None:
            if not isinstance(self.mask, Image.Image):
                raise RequestError(f"mask must be an image, got {type(self.mask).__name__}")
            if self.mask.size != self.init_image.size:
                raise RequestError(f"mask is {self.mask.width}x{self.mask.height} but the image is "
                                   f"{self.init_image.width}x{self.init_image.height}; give a mask of the image's size")
        check_int_range("mask_blur", self.mask_blur, 0, 256)
        check_int_range("only_masked_padding", self.only_masked_padding, 0, 4096)
        if self.masked_content not in MASKED_CONTENT:
            raise RequestError(f"masked_content must be one of {', '.join(MASKED_CONTENT)}, "
                               f"got {self.masked_content!r}")


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
