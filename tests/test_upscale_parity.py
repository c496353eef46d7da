"""The x4 upscaler against diffusers' StableDiffusionUpscalePipeline on a tiny random-weight model.

The tiny model has the real one's structure: a U-Net with 7 input channels, the noise level as a
class embedding, cross-attention-only first attentions on some levels, v-prediction; a VAE with
factor 4 and latent scale 0.08333; an OpenCLIP-style text encoder. Both runs use an Euler
scheduler (diffusers' EulerDiscreteScheduler with linspace timesteps), the same latent noise and
the same noise added to the low-resolution image. Tolerance: 3/255 max, 0.6/255 mean per pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)

from img2img_reference import as_array, assert_close, sample_image
from reference_clip import randomize
from reference_models import randomize_weights
from reference_pipelines import reference_tokenizer
from sdgen.models.upscaler import UpscalerUNetConfig
from sdgen.pipelines.request import RequestError
from sdgen.pipelines.upscale import AUGMENTATION_SEED_OFFSET, StableDiffusionUpscaler

PROMPT, NEGATIVE, SEED, CFG, LOW = "a sharp photo of a lake", "blurry", 77, 6.0, 24

UNET = dict(
    sample_size=32, in_channels=7, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
    only_cross_attention=(False, True, False), num_class_embeds=100,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("x4")
    torch.manual_seed(0)
    unet = randomize_weights(UNet2DConditionModel(**UNET), 2).eval()
    vae = randomize_weights(AutoencoderKL(
        block_out_channels=(32, 32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2, scaling_factor=0.08333), 1).eval()
    text_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=2, pad_token_id=1)
    text_encoder = randomize(transformers.CLIPTextModel(text_config), 0, scale=0.3)
    reference = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=reference_tokenizer(workdir / "vocab", "!"), unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                prediction_type="v_prediction", set_alpha_to_one=False, clip_sample=False),
        max_noise_level=350)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(workdir / "model", safe_serialization=True)
    return reference, StableDiffusionUpscaler.load(workdir / "model")


def _low_res(size: int = LOW):
    return sample_image(64).resize((size, size))


def _diffusers(reference, steps: int, noise_level: int) -> np.ndarray:
    scheduler = EulerDiscreteScheduler.from_config(dict(reference.scheduler.config), timestep_spacing="linspace")
    reference.scheduler = scheduler
    scheduler.set_timesteps(steps)
    latents = torch.randn((1, 4, LOW, LOW), generator=torch.Generator().manual_seed(SEED)) * scheduler.sigmas[0]
    # the generator's first draw is the noise added to the low-resolution image
    generator = torch.Generator().manual_seed(SEED + AUGMENTATION_SEED_OFFSET)
    image = reference(PROMPT, image=_low_res(), negative_prompt=NEGATIVE, num_inference_steps=steps,
                      guidance_scale=CFG, noise_level=noise_level, generator=generator,
                      latents=latents / scheduler.init_noise_sigma, output_type="np").images[0]
    return image.astype(np.float64)


def test_config_round_trip(models):
    reference, ours = models
    cfg = ours.unet.upscaler_cfg
    assert cfg.only_cross_attention == (False, True, False) and cfg.num_class_embeds == 100
    assert UpscalerUNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    with pytest.raises(ValueError, match="num_class_embeds"):
        UpscalerUNetConfig.from_diffusers({k: v for k, v in UNET.items() if k != "num_class_embeds"})


@pytest.mark.parametrize("noise_level", [20, 90])
def test_upscale_matches_diffusers(models, noise_level):
    reference, ours = models
    expected = _diffusers(reference, 5, noise_level)
    result = ours.upscale(image=_low_res(), prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=5,
                          sampler="Euler", scheduler="uniform", cfg_scale=CFG, noise_level=noise_level)
    assert result.images[0].size == (4 * LOW, 4 * LOW)
    worst, mean = assert_close(as_array(result.images[0]), expected)
    print(f"x4 upscaler (noise level {noise_level}) vs diffusers: max {worst:.3f}/255, mean {mean:.4f}/255")
    assert "Noise level: " in result.infotexts[0] and f"Size: {4 * LOW}x{4 * LOW}" in result.infotexts[0]


def test_tiled_upscale_runs_the_unet_on_overlapping_tiles(models, monkeypatch):
    """Tiles cover the image and blend; a tile as large as the image is the untiled computation.

    (How close tiled and whole results are depends on the model: this random U-Net's attention
    mixes the whole image, so here they differ a lot; a trained model's attention is mostly local.)
    """
    reference, ours = models
    common = dict(image=_low_res(40), prompt=PROMPT, seed=SEED, steps=2, sampler="Euler", cfg_scale=CFG)
    sizes = []
    forward = ours.unet.forward
    monkeypatch.setattr(ours.unet, "forward", lambda x, *a, **k: sizes.append(tuple(x.shape[-2:])) or forward(x, *a, **k))
    whole = ours.upscale(tile=40, tile_overlap=8, **common).images[0]
    assert set(sizes) == {(40, 40)}
    sizes.clear()
    tiled = ours.upscale(tile=24, tile_overlap=12, **common).images[0]
    assert set(sizes) == {(24, 24)} and len(sizes) == 2 * 9  # 3 x 3 tiles per step
    assert tiled.size == whole.size == (160, 160) and np.asarray(tiled).std() > 5


def test_bad_upscale_requests(models):
    reference, ours = models
    with pytest.raises(RequestError, match="noise_level"):
        ours.upscale(image=_low_res(), noise_level=100)  # the tiny model has 100 levels
    with pytest.raises(RequestError, match="image"):
        ours.upscale(image="low.png")
    from PIL import Image

    with pytest.raises(RequestError, match="x4 upscale would be"):
        ours.upscale(image=Image.new("RGB", (4000, 100)))
