"""img2img, inpainting and outpainting: fitting the input and the mask, then the shared sampling core.

The order of operations is AUTOMATIC1111 1.10's `StableDiffusionProcessingImg2Img.init`:
1. the mask becomes greyscale (a transparent mask's alpha), is inverted if asked, and blurred;
2. "only masked": the mask's bounding box plus padding, grown to the generation's aspect ratio,
   is cut from image and mask and scaled to the generation size ("fill" resize); otherwise the
   image and mask are fitted to the generation size by the request's resize mode;
3. the masked area's starting content: the original, "fill" (blurred surroundings), or in
   latent space noise or zeros;
4. latents are the VAE posterior mean; the latent mask is the mask resized bicubically to the
   latent size and rounded; at every step the denoised latents keep the original outside it;
5. the decoded result is pasted over the original through the blurred mask (doubled for
   whole-picture inpainting), so pixels outside the mask are the input's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from sdgen.diffusion.noise import ImageNoise
from sdgen.pipelines.images import to_pil
from sdgen.pipelines.masks import (
    binary_mask, blur_mask, crop_region, expand_to_ratio, fill_masked, flatten, latent_mask, outpaint_canvas,
    overlay_mask, paste_back, pixel_mask, resize_image, round_up,
)
from sdgen.pipelines.request import Img2ImgRequest, RequestError
from sdgen.provenance import preflight


def pixels_from_pil(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> (batch, 3, H, W) float in [-1, 1] (x / 127.5 - 1, as A1111 and diffusers)."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0


@dataclass
class PreparedInput:
    """The input fitted to the generation size, its mask, and what the result is pasted back onto."""

    image: Image.Image  # what the VAE encodes (generation size, masked content applied)
    mask: Image.Image | None = None  # blurred mask at generation size, white = repaint
    original: Image.Image | None = None  # the image the result is pasted onto
    overlay: Image.Image | None = None  # the paste-back mask at the original's size
    region: tuple[int, int, int, int] | None = None  # "only masked": where in the original the result goes
    parameters: dict = field(default_factory=dict)  # infotext keys (A1111's names)


def prepare_input(request: Img2ImgRequest, width: int, height: int) -> PreparedInput:
    """Steps 1-3 above on PIL images."""
    image = flatten(request.init_image)
    parameters: dict = {}
    mask = overlay = region = None
    if request.mask is not None:
        mask = blur_mask(binary_mask(request.mask, request.mask_invert), request.mask_blur)
        parameters["Mask blur"] = request.mask_blur
        if request.mask_invert:
            parameters["Mask mode"] = "Inpaint not masked"
        if request.only_masked:
            region = crop_region(mask, request.only_masked_padding)
            if region is None:
                mask = None  # a blank mask: plain img2img, as A1111
            else:
                region = expand_to_ratio(region, width, height, mask.width, mask.height)
                overlay = mask
                mask = resize_image("fill", mask.crop(region), width, height)
                parameters["Inpaint area"] = "Only masked"
                parameters["Masked area padding"] = request.only_masked_padding
        if mask is not None and region is None:
            mask = resize_image(request.resize_mode, mask, width, height)
            overlay = overlay_mask(mask)
    if region is None:
        image = resize_image(request.resize_mode, image, width, height)
    original = image
    if region is not None:
        image = resize_image("fill", image.crop(region), width, height)
    if mask is not None and request.masked_content != "original":
        image = fill_masked(image, mask)
        if request.masked_content == "fill":
            parameters["Masked content"] = "fill"
    return PreparedInput(image, mask, original if mask is not None else None, overlay, region, parameters)


def run_img2img(pipe, request: Img2ImgRequest, *, progress: bool = False, callback=None,
                output_type: str = "pil"):
    """img2img / inpainting with `pipe` (a StableDiffusion): prepare, encode, sample, decode, paste back."""
    from sdgen.pipelines.stable_diffusion import SamplingJob

    request.validate()
    width, height = request.resolved_size()
    request = replace(request, width=width, height=height).with_seed()
    preflight(pipe, request)  # memory estimate, watermark package: refused before anything is allocated
    prepared = prepare_input(request, width, height)
    pixels = pixels_from_pil([prepared.image]).to(pipe.device)
    init = pipe.encode(pixels)
    keep = None
    if prepared.mask is not None:
        repaint = latent_mask(prepared.mask, init.shape[-1], init.shape[-2]).to(init)
        if request.masked_content == "latent noise":
            # A1111 fills with the first draw of each image's seed (without variation seed).
            noise = ImageNoise(request.image_seeds()[0], init.shape[1:], device=pipe.device).initial()
            init = init * (1 - repaint) + noise * repaint
        elif request.masked_content == "latent nothing":
            init = init * (1 - repaint)
        if request.inpaint_blend:
            keep = 1 - repaint
    image_cond = None
    if pipe.is_inpainting_model:
        mask = pixel_mask(prepared.mask) if prepared.mask is not None else None
        image_cond = pipe.inpainting_conditioning(pixels, mask)
    job = SamplingJob(tuple(init.shape[1:]), request.steps, strength=request.strength, init_latents=init,
                      keep=keep, image_cond=image_cond)
    latents = pipe.sample_latents(request, job, progress=progress, callback=callback)
    images = None
    if output_type == "pil":
        images = to_pil(pipe.decode(latents))
        if prepared.mask is not None:
            images = [paste_back(image, prepared.original, prepared.overlay, prepared.region) for image in images]
    return pipe.result(request, latents, output_type, prepared.parameters, images=images)


def outpaint_request(request: Img2ImgRequest, *, left: int = 0, right: int = 0, up: int = 0,
                     down: int = 0) -> Img2ImgRequest:
    """The inpainting request that outpaints `request.init_image` by the given pixels on each side.

    The canvas grows to multiples of 8 on the right and at the bottom; the new border starts from
    the stretched edge pixels and the mask reaches 2 * mask_blur pixels into the image so that the
    seam is repainted and blended.
    """
    for name, value in (("left", left), ("right", right), ("up", up), ("down", down)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096:
            raise RequestError(f"{name} must be an integer number of pixels from 0 to 4096, got {value!r}")
    if not (left or right or up or down):
        raise RequestError("left, right, up and down are all 0: give at least one side to extend")
    if not isinstance(request.init_image, Image.Image):
        raise RequestError("init_image must be an image (PNG, JPEG or WEBP)")
    image = flatten(request.init_image)
    right += round_up(image.width + left + right) - (image.width + left + right)
    down += round_up(image.height + up + down) - (image.height + up + down)
    canvas, mask = outpaint_canvas(image, left, right, up, down, request.mask_blur)
    return replace(request, init_image=canvas, mask=mask, width=None, height=None, only_masked=False,
                   mask_invert=False, resize_mode="stretch")
