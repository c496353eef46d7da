"""The embedded model as shipped: its files, the reference drawing the same image from them, the
default-model CLI path, and its small CLIP against the reference CLIPModel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdgen
from reference_pipelines import reference_euler_image
from sdgen.cli import main
from sdgen.pipelines.loading import embedded_model_path

FOLDER = embedded_model_path()
PROMPT = "a red circle above a blue square on a white background"


def test_shipped_folder_is_complete_and_small():
    files = {p.relative_to(FOLDER).as_posix(): p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
            "clip/config.json", "clip/model.safetensors", "clip/preprocessor_config.json",
            "tiny_decoder.safetensors"} <= set(files)
    assert sum(files.values()) < 40 * 2**20


def test_reference_draws_the_same_image_from_the_shipped_files():
    torch.set_num_threads(1)
    ours = sdgen.load()
    side, seed, steps, cfg = ours.native_size, 11, 6, 7.5
    image = np.asarray(ours.generate(prompt=PROMPT, seed=seed, steps=steps, sampler="Euler", cfg_scale=cfg).images[0])
    theirs = reference_euler_image(FOLDER, PROMPT, seed, steps, cfg, side, float(ours.schedule.sigma_max))
    difference = np.abs(image / 255.0 - theirs)
    assert image.shape == (side, side, 3)
    assert difference.max() <= 3 / 255 and difference.mean() <= 0.6 / 255


def test_cli_generates_with_the_embedded_model_by_default(tmp_path, capsys):
    assert main(["generate", PROMPT, "--seed", "5", "--steps", "4", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.png")
    assert str(path) in capsys.readouterr().out
    with Image.open(path) as image:
        assert image.size == (sdgen.load().native_size,) * 2
        assert image.text["parameters"].startswith(PROMPT) and "Seed: 5" in image.text["parameters"]


def test_small_clip_scores_equal_the_reference_clip_model():
    transformers = pytest.importorskip("transformers")
    from sdgen.pipelines.ranking import CLIPRanker

    folder = FOLDER / "clip"
    ranker = CLIPRanker.from_folder(folder)
    reference = transformers.CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    side = json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)) for i in range(3)]
    ours = ranker.scores(images, PROMPT)[1]
    tokens = ranker.tokenizer([PROMPT], max_length=ranker.model.config.text.max_positions)
    pixels = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"])
    with torch.no_grad():
        theirs = reference(input_ids=tokens, pixel_values=pixels).logits_per_image[:, 0]
    assert torch.allclose(ours, theirs.float(), rtol=1e-4, atol=1e-4), (ours, theirs)


def test_shipped_tiny_decoder_previews_what_the_vae_shows():
    """The preview decoder distilled from the shipped VAE: on held-out scenes' latents its pictures
    are close to the VAE's (35.3 dB measured at export, README's recipe), and far closer than the
    linear preview map's (18 dB); the server uses it for the embedded model's previews."""
    from sdgen.models.tiny_decoder import folder_tiny_decoder, load_tiny_decoder
    from sdgen.train.continue_from import read_training_record
    from sdgen.train.evaluate import tiny_decoder_quality

    torch.set_num_threads(1)
    pipe = sdgen.load()
    decoder = load_tiny_decoder(folder_tiny_decoder(None))
    assert decoder.upscale == pipe.latent_factor and decoder.cfg.latent_channels == pipe.vae.cfg.latent_channels
    assert read_training_record(FOLDER)["tiny_decoder"] > 0
    quality = tiny_decoder_quality(pipe, decoder, [], [], scenes=64)
    assert quality["scenes_psnr_db"] > 33.0, quality
