"""Inpainting on tiny random-weight models: both paths against a reference.

- Inpainting U-Net (9 input channels: latents, mask, masked-image latents) against diffusers'
  StableDiffusionInpaintPipeline. diffusers does not blend the kept latents, so this run sets
  `inpaint_blend=False`; diffusers does not paste the original back either, so the reference's
  unmasked pixels are replaced by the original's (our paste-back, with a sharp mask).
- The same model and an ordinary 4-channel one with AUTOMATIC1111's blend (the denoised latents
  keep the original outside the latent mask at every step, then once more at the end), against
  k-diffusion driven by hand with the mask blurred by scipy and resized as A1111 does.
Strength mapping as in test_img2img_parity: ours 0.5 with 4 steps = diffusers' 0.75.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter1d

import sdgen
from img2img_reference import (
    CFG, NEGATIVE, PROMPT, SEED, as_array, assert_close, kdiffusion_img2img, pixels, reference_decode,
    reference_encode, sample_image, sample_mask,
)
from reference_models import make_reference_unet
from reference_pipelines import make_reference_pipeline, save_folder
from test_img2img_parity import mean_posterior


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def inpainting_models(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"{request.param}-inpaint")
    base = make_reference_pipeline(request.param, workdir)
    components = {**base.components, "unet": make_reference_unet(request.param, seed=2, in_channels=9)}
    reference = StableDiffusionInpaintPipeline(**components)
    reference.set_progress_bar_config(disable=True)
    folder = save_folder(reference, workdir / "model")
    return request.param, reference, sdgen.load(folder)


@pytest.fixture(scope="module")
def ordinary_model(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd1-blend")
    reference = make_reference_pipeline("sd1", workdir)
    return reference, sdgen.load(save_folder(reference, workdir / "model"))


def _inpaint(pipe, **fields):
    fields = {"init_image": sample_image(), "mask": sample_mask(), "prompt": PROMPT, "negative_prompt": NEGATIVE,
              "seed": SEED, "cfg_scale": CFG, "sampler": "Euler", "steps": 4, "strength": 0.5, **fields}
    return pipe.inpaint(**fields)


def _paste(generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The original where mask is 0, `generated` where 1, blended between (mask in [0, 1])."""
    original = as_array(sample_image())
    return generated * mask[..., None] + original * (1 - mask[..., None])


def test_inpainting_model_matches_diffusers(inpainting_models, monkeypatch):
    family, reference, pipe = inpainting_models
    assert pipe.is_inpainting_model and pipe.unet.cfg.in_channels == 9
    reference.scheduler = EulerDiscreteScheduler.from_config(dict(reference.scheduler.config),
                                                             timestep_spacing="linspace")
    mean_posterior(monkeypatch, reference.vae)
    expected = reference(PROMPT, image=sample_image(), mask_image=sample_mask(), negative_prompt=NEGATIVE,
                         strength=0.75, num_inference_steps=4, guidance_scale=CFG, output_type="np",
                         generator=torch.Generator().manual_seed(SEED)).images[0].astype(np.float64)
    ours = _inpaint(pipe, mask_blur=0, inpaint_blend=False)
    expected = _paste(expected, as_array(sample_mask()))
    worst, mean = assert_close(as_array(ours.images[0]), expected)
    print(f"{family} 9-channel inpainting vs diffusers: max {worst:.3f}/255, mean {mean:.4f}/255")


def _a1111_masks(mask: Image.Image, blur: int, latent_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(latent keep mask, paste-back mask in [0, 1]) as A1111 makes them, with scipy's Gaussian."""
    array = np.asarray(mask, dtype=np.float64)
    if blur:
        for axis in (1, 0):  # cv2.GaussianBlur x then y, 8-bit rounding after each
            array = np.clip(np.round(gaussian_filter1d(array, blur, axis=axis, mode="mirror", truncate=2.5)), 0, 255)
    blurred = Image.fromarray(array.astype(np.uint8))
    small = np.asarray(blurred.convert("RGB").resize((latent_size, latent_size)), dtype=np.float32)[..., 0] / 255
    keep = torch.from_numpy(1 - np.around(small))[None, None]
    overlay = np.clip(array * 2, 0, 255) / 255
    return keep, overlay


@pytest.mark.parametrize("sampler, function, blur", [("Euler", "sample_euler", 0), ("Euler a", "sample_euler_ancestral", 4)])
def test_blend_inpainting_matches_a1111_by_hand(ordinary_model, sampler, function, blur):
    reference, pipe = ordinary_model
    image, mask = sample_image(), sample_mask()
    init = reference_encode(reference, image)
    keep, overlay = _a1111_masks(mask, blur, init.shape[-1])
    latents = kdiffusion_img2img(reference, init, function, 6, 0.6, keep=keep)
    expected = _paste(reference_decode(reference, latents), overlay)
    ours = _inpaint(pipe, sampler=sampler, steps=6, strength=0.6, mask_blur=blur)
    worst, mean = assert_close(as_array(ours.images[0]), expected)
    print(f"blend inpainting {sampler} blur {blur} vs A1111 by hand: max {worst:.3f}/255, mean {mean:.4f}/255")
    assert f"Mask blur: {blur}" in ours.infotexts[0]


def test_inpainting_model_with_blend_matches_a1111_by_hand(inpainting_models):
    family, reference, pipe = inpainting_models
    image, mask = sample_image(), sample_mask()
    init = reference_encode(reference, image)
    binary = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    with torch.no_grad():
        masked = reference.vae.encode(pixels(image) * (1 - binary)).latent_dist.mode() * reference.vae.config.scaling_factor
    image_cond = torch.cat([torch.nn.functional.interpolate(binary, size=init.shape[-2:]), masked], dim=1)
    keep, overlay = _a1111_masks(mask, 0, init.shape[-1])
    latents = kdiffusion_img2img(reference, init, "sample_euler", 4, 0.5, keep=keep, image_cond=image_cond)
    expected = _paste(reference_decode(reference, latents), overlay)
    ours = _inpaint(pipe, mask_blur=0)
    worst, mean = assert_close(as_array(ours.images[0]), expected)
    print(f"{family} 9-channel inpainting with blend vs A1111 by hand: max {worst:.3f}/255, mean {mean:.4f}/255")


def test_unmasked_pixels_are_the_original(ordinary_model):
    reference, pipe = ordinary_model
    for fields in ({}, {"masked_content": "fill"}, {"masked_content": "latent noise"},
                   {"masked_content": "latent nothing"}, {"mask_invert": True}):
        result = _inpaint(pipe, mask_blur=2, **fields)
        mask = np.asarray(sample_mask())
        if fields.get("mask_invert"):
            mask = 255 - mask
        untouched = np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(15))) == 0
        out, original = np.asarray(result.images[0]), np.asarray(sample_image())
        assert np.array_equal(out[untouched], original[untouched]), fields
        assert not np.array_equal(out, original)


def test_only_masked_works_on_a_crop_and_pastes_it_back(ordinary_model):
    reference, pipe = ordinary_model
    image = sample_image(96)
    mask = sample_mask(96, box=(60, 10, 80, 30))
    result = pipe.inpaint(init_image=image, mask=mask, prompt=PROMPT, seed=3, steps=3, strength=0.8,
                          only_masked=True, only_masked_padding=8, mask_blur=2, width=64, height=64)
    out = np.asarray(result.images[0])
    assert result.images[0].size == (96, 96)  # the original's size, not the generation's
    assert "Inpaint area: Only masked" in result.infotexts[0] and "Masked area padding: 8" in result.infotexts[0]
    outside = np.ones((96, 96), dtype=bool)
    outside[0:40, 50:90] = False  # the mask (60..80, 10..30) with its blur
    assert np.array_equal(out[outside], np.asarray(image)[outside])
    assert not np.array_equal(out[10:30, 60:80], np.asarray(image)[10:30, 60:80])


def test_only_masked_with_blank_mask_is_plain_img2img(ordinary_model):
    reference, pipe = ordinary_model
    blank = Image.new("L", (64, 64), 0)
    result = pipe.inpaint(init_image=sample_image(), mask=blank, prompt=PROMPT, seed=3, steps=3, strength=0.5,
                          only_masked=True)
    plain = pipe.img2img(init_image=sample_image(), prompt=PROMPT, seed=3, steps=3, strength=0.5)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


def test_outpaint_extends_the_canvas_and_keeps_the_middle(ordinary_model):
    reference, pipe = ordinary_model
    image = sample_image(64).crop((0, 0, 60, 64))
    result = pipe.outpaint(init_image=image, left=16, up=8, prompt=PROMPT, seed=5, steps=3, strength=0.8,
                           mask_blur=2, masked_content="fill")
    out = np.asarray(result.images[0])
    assert result.images[0].size == (80, 72)  # 16 + 60 (+ 4 to reach a multiple of 8) x 8 + 64
    # 2 * blur + the blur's reach in from each new edge (the right one is the 4 pixels of rounding)
    middle = out[8 + 12:, 16 + 12:16 + 60 - 12]
    assert np.array_equal(middle, np.asarray(image)[12:, 12:48])
    assert out[:8].std() > 0  # the new band is drawn, not blank


def test_inpaint_needs_a_mask(ordinary_model):
    from sdgen.pipelines.request import RequestError

    reference, pipe = ordinary_model
    with pytest.raises(RequestError, match="mask"):
        pipe.inpaint(init_image=sample_image(), prompt=PROMPT)
    with pytest.raises(RequestError, match="left, right, up and down"):
        pipe.outpaint(init_image=sample_image(), prompt=PROMPT)
