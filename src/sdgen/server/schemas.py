"""Request and response models of the AUTOMATIC1111 routes (field names, types and defaults of A1111 1.10).

Every request field is optional and nullable (null means the default); unknown fields are
ignored, as real clients send Forge-only and extension fields. Wrong types give FastAPI's 422
naming the field. `width`/`height` default to None: the loaded model's native size (A1111
always uses 512).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    """Unknown keys ignored; field names starting with `model_` allowed."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class GenerationFields(Lenient):
    """Fields shared by txt2img and img2img (A1111's StableDiffusionProcessing)."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = Field(None, description="multiple of 8; null: the model's native size (A1111: 512)")
    height: int | None = Field(None, description="multiple of 8; null: the model's native size (A1111: 512)")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = []
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(GenerationFields):
    """`POST /sdapi/v1/txt2img`."""

    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(GenerationFields):
    """`POST /sdapi/v1/img2img`: `init_images` as base64 (a `data:image/...;base64,` prefix is fine)."""

    init_images: list[str] | None = None
    resize_mode: int | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False
    denoising_strength: float | None = 0.75


class JobRequest(Img2ImgRequest):
    """`POST /api/v1/jobs`: txt2img fields; with `init_images` it is an img2img (or, with `mask`, inpainting) job."""

    init_images: list[str] | None = None
    denoising_strength: float | None = None


class GenerationResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs, each with its `parameters` text chunk")
    parameters: dict
    info: str = Field(description="a JSON string: A1111's Processed.js()")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoRequest(Lenient):
    image: str = Field(description="a base64 PNG, JPEG or WEBP")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class SDModelItem(Lenient):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SDVaeItem(Lenient):
    model_name: str
    filename: str


class UpscalerItem(Lenient):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, dict]
    skipped: dict[str, dict]


class JobAccepted(BaseModel):
    id: str
    state: str
    position: int = Field(description="active jobs queued before this one")
    url: str
    events: str
