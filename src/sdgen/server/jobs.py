"""From an A1111-style request to a queued job, and from a finished job to A1111's `info`.

Everything a user can get wrong is checked here, before the job is queued and before any
tensor is allocated: field values against the server's limits, sampler and model names,
images (format, size) decoded from base64.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import uuid
from dataclasses import asdict

from PIL import Image

import sdgen
from sdgen.diffusion.registry import resolve_sampler, schedule_label
from sdgen.pipelines.infotext import parse_infotext
from sdgen.pipelines.output import save_png_atomic
from sdgen.pipelines.request import (MASKED_CONTENT, RESIZE_MODES, GenerationRequest, Img2ImgRequest, Limits,
                                     RequestError, check_float_range)
from sdgen.server.catalog import Catalog
from sdgen.server import schemas
from sdgen.server.schemas import GenerationFields
from sdgen.server.store import Job, Store

# Request fields of features sdgen does not have: refused when switched on, never silently ignored.
UNSUPPORTED_FLAGS = ("restore_faces", "tiling")
MAX_IMAGE_BYTES = 24 * 1024 * 1024

# infotext key -> (request field, converter), for `infotext` filling fields not given explicitly
INFOTEXT_FIELDS = {
    "Prompt": ("prompt", str), "Negative prompt": ("negative_prompt", str), "Steps": ("steps", int),
    "Sampler": ("sampler_name", str), "Schedule type": ("scheduler", str), "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int), "Size-1": ("width", int), "Size-2": ("height", int),
    "Denoising strength": ("denoising_strength", float),
}


def decode_image(data: str, field: str, limits: Limits) -> Image.Image:
    """A base64 PNG/JPEG/WEBP (optionally a data: URL) checked for size before it is decoded."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field} must be a base64-encoded PNG, JPEG or WEBP image")
    data = data.strip()
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if data.startswith(("http://", "https://")):
        raise RequestError(f"{field}: image URLs are not fetched; send the image as base64")
    if len(data) * 3 // 4 > MAX_IMAGE_BYTES:
        raise RequestError(f"{field} is over {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        raw = base64.b64decode(data, validate=False)
        image = Image.open(io.BytesIO(raw), formats=["PNG", "JPEG", "WEBP"])
    except Image.DecompressionBombError:
        raise RequestError(f"{field} declares more pixels than the server's image size limit") from None
    except (binascii.Error, ValueError, OSError, SyntaxError) as error:
        raise RequestError(f"{field} is not a readable base64 PNG, JPEG or WEBP image ({error})") from None
    if image.width * image.height > limits.max_side ** 2 or max(image.size) > 4 * limits.max_side:
        raise RequestError(f"{field} is {image.width}x{image.height}, over the server's image size limit")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise RequestError(f"{field} is a damaged image ({error})") from None
    return image


def _fill_from_infotext(request: GenerationFields) -> GenerationFields:
    """A1111's `infotext` field: its values fill the fields the request did not set."""
    if not request.infotext:
        return request
    parsed = parse_infotext(request.infotext)
    updates = {}
    for key, (name, convert) in INFOTEXT_FIELDS.items():
        if key in parsed and name not in request.model_fields_set and hasattr(request, name):
            try:
                updates[name] = convert(parsed[key])
            except ValueError:
                raise RequestError(f"infotext: {key} {parsed[key]!r} is not a valid value") from None
    if "Clip skip" in parsed:
        settings = dict(request.override_settings or {})
        settings.setdefault("CLIP_stop_at_last_layers", parsed["Clip skip"])
        updates["override_settings"] = settings
    return request.model_copy(update=updates)


def _pick(value, default):
    return default if value is None else value


def _hires_fields(request: GenerationFields) -> dict:
    """A1111's hires fix fields as GenerationRequest's (`denoising_strength` is the second pass's)."""
    if not getattr(request, "enable_hr", False):
        return {}
    if request.hr_resize_x or request.hr_resize_y:
        raise RequestError("hr_resize_x / hr_resize_y are not supported; use hr_scale")
    return {"hires_scale": _pick(request.hr_scale, 2.0), "hires_strength": _pick(request.denoising_strength, 0.7),
            "hires_steps": _pick(request.hr_second_pass_steps, 0), "hires_upscaler": request.hr_upscaler or "Latent"}


NO_REFINER = (None, "", "None", "none")  # what A1111's UI and clients send when the refiner is off


def _refiner_fields(request: GenerationFields, kind: str, generation: GenerationRequest, catalog: Catalog) -> dict:
    """A1111's refiner fields: a refiner runs only when both `refiner_checkpoint` and `refiner_switch_at` are set."""
    name, switch_at = request.refiner_checkpoint, request.refiner_switch_at
    if name in NO_REFINER or switch_at is None:
        return {}
    entry = catalog.require(name, "refiner_checkpoint")
    if kind != "txt2img":
        raise RequestError("refiner_checkpoint: the refiner hands off only in txt2img; for img2img run the "
                           "refiner as the model (override_settings.sd_model_checkpoint) instead")
    if generation.hires_scale is not None:
        raise RequestError("refiner_checkpoint: the hires fix does not combine with a refiner; set enable_hr false")
    check_float_range("refiner_switch_at", switch_at, 0.0, 1.0)
    if not 0.0 < switch_at < 1.0:
        raise RequestError(f"refiner_switch_at must be between 0 and 1 (exclusive), got {switch_at!r}")
    return {"refiner_checkpoint": entry.title, "refiner_switch_at": switch_at}


def build_params(request: GenerationFields, kind: str, catalog: Catalog, options: dict, limits: Limits) -> dict:
    """Validated job parameters (JSON-able) for a txt2img or img2img request; RequestError names the field."""
    request = _fill_from_infotext(request)
    for flag in UNSUPPORTED_FLAGS:
        if getattr(request, flag, None):
            raise RequestError(f"{flag} is not supported by sdgen; leave it false")
    if request.script_name:
        raise RequestError(f"script_name: no scripts are installed in sdgen (got {request.script_name!r})")
    if request.alwayson_scripts:
        raise RequestError(f"alwayson_scripts: no scripts are installed in sdgen (got {sorted(request.alwayson_scripts)})")
    settings = {**options, **(request.override_settings or {})}
    model = settings.get("sd_model_checkpoint")
    entry = catalog.require(model if isinstance(model, str) else None, "override_settings.sd_model_checkpoint")
    clip_skip = settings.get("CLIP_stop_at_last_layers", 1)
    try:
        clip_skip = int(clip_skip)
    except (TypeError, ValueError):
        raise RequestError(f"CLIP_stop_at_last_layers must be an integer, got {clip_skip!r}") from None
    sampler = request.sampler_name or request.sampler_index or "Euler"
    spec, schedule = resolve_sampler(sampler, request.scheduler)
    batch_size, n_iter = _pick(request.batch_size, 1), _pick(request.n_iter, 1)
    if not isinstance(n_iter, int) or n_iter < 1:
        raise RequestError(f"n_iter must be a positive integer, got {n_iter!r}")
    generation = GenerationRequest(
        prompt=_pick(request.prompt, ""), negative_prompt=_pick(request.negative_prompt, ""),
        seed=_pick(request.seed, -1), steps=_pick(request.steps, 50), sampler=spec.name, scheduler=schedule,
        cfg_scale=_pick(request.cfg_scale, 7.0), width=request.width, height=request.height,
        n=n_iter * batch_size, batch_size=batch_size, clip_skip=clip_skip, subseed=_pick(request.subseed, -1),
        subseed_strength=_pick(request.subseed_strength, 0.0), **_hires_fields(request))
    if generation.n > limits.max_images:
        raise RequestError(f"n_iter x batch_size is {generation.n} images; the limit is {limits.max_images}")
    if (generation.width is None) != (generation.height is None):
        raise RequestError("width and height: give both or neither (neither: the model's native size)")
    generation.validate(limits)
    generation = generation.with_seed()
    params = asdict(generation)
    params.update(model=entry.title, n_iter=n_iter, sampler_name=spec.name,
                  schedule_label=schedule_label(spec, schedule))
    if generation.hires_scale is not None:
        params["denoising_strength"] = generation.hires_strength
    params.update(_refiner_fields(request, kind, generation, catalog))
    if kind == "img2img":
        strength = _pick(request.denoising_strength, 0.75)
        check_float_range("denoising_strength", strength, 0.0, 1.0)
        params["denoising_strength"] = strength
    return params


def _choice(name: str, value: int, choices: tuple[str, ...]) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(choices):
        raise RequestError(f"{name} must be one of {', '.join(f'{i} ({c})' for i, c in enumerate(choices))}, got {value!r}")
    return choices[value]


def save_inputs(request: schemas.Img2ImgRequest, params: dict, store: Store, limits: Limits) -> None:
    """Decode, check and keep img2img inputs in `data_dir/inputs` so a queued job survives a restart."""
    if not request.init_images:
        raise RequestError("init_images: img2img needs one base64 image")
    init = decode_image(request.init_images[0], "init_images[0]", limits).convert("RGB")
    mask = decode_image(request.mask, "mask", limits).convert("L") if request.mask else None
    options = {"resize_mode": _choice("resize_mode", _pick(request.resize_mode, 0), RESIZE_MODES)}
    if mask is not None:
        options.update(
            mask_blur=_pick(request.mask_blur, _pick(request.mask_blur_x, 4)),
            masked_content=_choice("inpainting_fill", _pick(request.inpainting_fill, 0), MASKED_CONTENT),
            only_masked=bool(_pick(request.inpaint_full_res, True)),
            only_masked_padding=_pick(request.inpaint_full_res_padding, 0),
            mask_invert=bool(_pick(request.inpainting_mask_invert, 0)))
    fields = {k: v for k, v in params.items() if k in GenerationRequest.__dataclass_fields__}
    Img2ImgRequest(**fields, init_image=init, mask=mask, strength=params["denoising_strength"],
                   **options).validate(limits)
    name = uuid.uuid4().hex
    params["_init_image"] = str(save_png_atomic(init, store.inputs / f"{name}-init.png"))
    if mask is not None:
        params["_mask"] = str(save_png_atomic(mask, store.inputs / f"{name}-mask.png"))
    params["img2img_options"] = options


def job_kind(request: GenerationFields) -> str:
    return "img2img" if getattr(request, "init_images", None) else "txt2img"


def info_dict(job: Job) -> dict:
    """A1111's `Processed.js()` for a finished job: every key strict clients check, always present."""
    params, result = job.params, job.result
    seeds = result.get("seeds", [])
    count = len(seeds)
    prompt, negative = params.get("prompt", ""), params.get("negative_prompt", "")
    strength = params.get("denoising_strength")
    return {
        "prompt": prompt, "all_prompts": [prompt] * count,
        "negative_prompt": negative, "all_negative_prompts": [negative] * count,
        "seed": result.get("seed", params.get("seed")), "all_seeds": seeds,
        "subseed": params.get("subseed", -1), "all_subseeds": [-1 if s is None else s for s in result.get("subseeds", [None] * count)],
        "subseed_strength": params.get("subseed_strength", 0),
        "width": result.get("width", params.get("width")), "height": result.get("height", params.get("height")),
        "sampler_name": params.get("sampler_name"), "cfg_scale": params.get("cfg_scale"),
        "steps": params.get("steps"), "batch_size": params.get("batch_size"),
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": result.get("model_name"), "sd_model_hash": result.get("model_hash"),
        "sd_vae_name": result.get("vae"), "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": strength,
        "extra_generation_params": {"Schedule type": params.get("schedule_label")},
        "index_of_first_image": 0, "infotexts": result.get("infotexts", []), "styles": [],
        "job_timestamp": result.get("job_timestamp", ""), "clip_skip": params.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False, "version": f"sdgen {sdgen.__version__}",
    }


def info_json(job: Job) -> str:
    return json.dumps(info_dict(job))


def echo_parameters(request: GenerationFields, params: dict) -> dict:
    """The `parameters` A1111 returns: the request with defaults, images left out, seed resolved."""
    echo = request.model_dump()
    echo.pop("init_images", None)
    echo.pop("mask", None)
    echo["seed"] = params["seed"]
    return echo

