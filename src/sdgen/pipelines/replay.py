"""Replay: the request an image's infotext describes, run again for the same pixels.

txt2img (with hires fix and variation seeds) replays from the infotext alone. img2img and
inpainting images record their settings but not their input, so the input image (and the mask)
must be given again. The infotext's model hash must match the loaded model's: another model
would draw another picture.
"""

from __future__ import annotations

from dataclasses import fields
from PIL import Image

from sdgen.diffusion.registry import resolve_sampler
from sdgen.errors import UserError
from sdgen.pipelines.infotext import parse_infotext
from sdgen.pipelines.request import GenerationRequest, Img2ImgRequest


class ReplayError(UserError):
    """The infotext cannot be replayed as it is (missing keys, another model, no input image)."""


def _number(params: dict[str, str], key: str, kind):
    try:
        return kind(params[key])
    except (KeyError, ValueError):
        raise ReplayError(f"the infotext has no usable {key!r} (got {params.get(key)!r})") from None


def step_cache_of(text: str) -> int:
    """The step-cache interval an image was made with (`Step cache: N`), 0 when none."""
    params = parse_infotext(text)
    if "Step cache" not in params:
        return 0
    interval = _number(params, "Step cache", int)
    if interval < 2:
        raise ReplayError(f"the infotext's 'Step cache' must be at least 2 (got {interval})")
    return interval


def token_merging_of(text: str) -> float:
    """The token merging ratio an image was made with (`Token merging ratio: R`), 0 when none."""
    params = parse_infotext(text)
    if "Token merging ratio" not in params:
        return 0.0
    from sdgen.runtime.token_merging import check_ratio

    try:
        return check_ratio(_number(params, "Token merging ratio", float))
    except ValueError as error:
        raise ReplayError(f"the infotext's {error}") from None


def int8_of(text: str) -> bool:
    """Whether an image was made on the int8 path (`Int8: True`)."""
    return parse_infotext(text).get("Int8", "").strip().lower() == "true"


def request_fields(text: str) -> dict:
    """GenerationRequest / Img2ImgRequest fields from an infotext (A1111's keys, as sdgen writes them)."""
    params = parse_infotext(text)
    for key in ("Steps", "Sampler", "Seed", "Size-1"):
        if key not in params:
            raise ReplayError(f"the infotext has no {key!r}: not generation parameters sdgen can replay")
    spec, schedule = resolve_sampler(params["Sampler"], params.get("Schedule type"))
    result = {
        "prompt": params.get("Prompt", ""),
        "negative_prompt": params.get("Negative prompt", ""),
        "steps": _number(params, "Steps", int),
        "sampler": spec.name,
        "scheduler": schedule,
        "cfg_scale": _number(params, "CFG scale", float) if "CFG scale" in params else 7.0,
        "seed": _number(params, "Seed", int),
        "width": _number(params, "Size-1", int),
        "height": _number(params, "Size-2", int),
        "clip_skip": _number(params, "Clip skip", int) if "Clip skip" in params else 1,
    }
    if "Variation seed strength" in params:
        result["subseed"] = _number(params, "Variation seed", int)
        result["subseed_strength"] = _number(params, "Variation seed strength", float)
    if "Hires upscale" in params:
        result["hires_scale"] = _number(params, "Hires upscale", float)
        result["hires_upscaler"] = params.get("Hires upscaler", "Latent")
        result["hires_steps"] = _number(params, "Hires steps", int) if "Hires steps" in params else 0
        result["hires_strength"] = _number(params, "Denoising strength", float)
    elif "Denoising strength" in params:
        result["strength"] = _number(params, "Denoising strength", float)
        if "Mask blur" in params:
            result["mask_blur"] = _number(params, "Mask blur", int)
            result["mask_invert"] = params.get("Mask mode") == "Inpaint not masked"
            result["masked_content"] = "fill" if params.get("Masked content") == "fill" else "original"
            result["only_masked"] = params.get("Inpaint area") == "Only masked"
            if "Masked area padding" in params:
                result["only_masked_padding"] = _number(params, "Masked area padding", int)
    result["_model_hash"] = params.get("Model hash")
    result["_model"] = params.get("Model")
    return result


def replay_request(text: str, *, init_image: Image.Image | None = None,
                   mask: Image.Image | None = None) -> GenerationRequest:
    """The request that regenerates the image whose infotext is `text` (img2img needs its input again)."""
    values = {k: v for k, v in request_fields(text).items() if not k.startswith("_")}
    if "strength" not in values:
        if init_image is not None or mask is not None:
            raise ReplayError("this image was made from text alone: drop --init and --mask")
        return GenerationRequest(**values)
    if init_image is None:
        raise ReplayError("this image was made by img2img / inpainting: pass its input image with --init "
                          "(and the mask with --mask)")
    if "mask_blur" in values and mask is None:
        raise ReplayError("this image was made by inpainting: pass its mask with --mask")
    known = {f.name for f in fields(Img2ImgRequest)}
    return Img2ImgRequest(init_image=init_image, mask=mask, **{k: v for k, v in values.items() if k in known})


def check_model(text: str, pipe) -> None:
    """ReplayError unless the infotext's model hash is the loaded model's (or the infotext has none)."""
    values = request_fields(text)
    recorded = values["_model_hash"]
    if recorded and recorded != pipe.model_hash:
        raise ReplayError(f"the image was made with model {values['_model'] or '?'} (hash {recorded}); the loaded "
                          f"model {pipe.name} has hash {pipe.model_hash}: pass the right one with --model")


def replay(pipe, text: str, *, init_image: Image.Image | None = None, mask: Image.Image | None = None, **options):
    """Run the request `text` describes on `pipe` (after checking the model): txt2img or img2img."""
    check_model(text, pipe)
    request = replay_request(text, init_image=init_image, mask=mask)
    if isinstance(request, Img2ImgRequest):
        return pipe.img2img(request, **options)
    return pipe.generate(request, **options)
