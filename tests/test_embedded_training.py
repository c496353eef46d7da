"""A few-step run of every training stage of the embedded-model recipe, then export and load.

The exported folder must load in sdgen and in the reference `StableDiffusionPipeline`, and both
must draw the same image for the same seed and sampler.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdgen
from sdgen.train.embedded import run_training

TINY_RECIPE = """
[data]
size = 32
seed = 5

[autoencoder]
block_out_channels = [32, 32, 32]
layers_per_block = 1
latent_channels = 4
norm_num_groups = 32
crop = 16
steps = 2
batch_size = 4
lr = 1e-3
kl_weight = 1e-6

[decoder]
steps = 2
batch_size = 4
lr = 1e-3

[clip]
hidden_size = 32
intermediate_size = 64
num_layers = 2
num_heads = 2
vision_hidden_size = 32
vision_layers = 1
patch_size = 8
projection_dim = 16
steps = 2
batch_size = 8
lr = 1e-3

[unet]
block_out_channels = [32, 64]
layers_per_block = 1
head_dim = 16
steps = 3
batch_size = 4
lr = 1e-3
caption_dropout = 0.5
ema_decay = 0.9
cached_scenes = 32

[tiny_decoder]
channels = 16
blocks = [1, 1, 1]
pairs = 24
steps = 2
batch_size = 4
lr = 1e-3
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    config = root / "tiny.toml"
    config.write_text(TINY_RECIPE)
    run_training("all", config_path=str(config), run_dir=str(root / "run"), out=str(root / "model"))
    return root


def test_every_stage_leaves_a_checkpoint_and_curve(trained):
    for stage in ("autoencoder", "decoder", "clip", "unet", "tiny_decoder"):
        assert (trained / "run" / stage / "checkpoint.pt").is_file()
        assert (trained / "run" / stage / "loss.png").is_file()
        assert (trained / "run" / stage / "metrics.jsonl").read_text().strip()
    layout = {p.relative_to(trained / "model").as_posix() for p in (trained / "model").rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "scheduler/scheduler_config.json", "clip/model.safetensors", "tiny_decoder.safetensors"} <= layout


def test_rerun_resumes_without_training_again(trained, monkeypatch):
    calls = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    run_training("unet", config_path=str(trained / "tiny.toml"), run_dir=str(trained / "run"))
    assert calls == []


def test_reference_pipeline_loads_export_and_draws_the_same_image(trained):
    from reference_pipelines import reference_euler_image

    ours = sdgen.load(trained / "model")
    prompt, seed, steps = "a red circle above a blue square", 3, 4
    image = np.asarray(ours.generate(prompt=prompt, seed=seed, steps=steps, sampler="Euler", cfg_scale=5.0).images[0])
    theirs = reference_euler_image(trained / "model", prompt, seed, steps, 5.0, 32, float(ours.schedule.sigma_max))
    difference = np.abs(image / 255.0 - theirs)
    assert difference.max() <= 3 / 255 and difference.mean() <= 0.6 / 255


def test_exported_clip_folder_declares_its_pixel_range(trained):
    """The small CLIP saw pixels in [-1, 1]; its folder says so to any CLIPImageProcessor."""

    from PIL import Image
    from transformers import CLIPImageProcessor

    folder = trained / "model" / "clip"
    side = json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]
    array = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=Image.fromarray(array), return_tensors="np")["pixel_values"][0]
    assert np.abs(pixels - (array.transpose(2, 0, 1) / 255 * 2 - 1)).max() < 1e-5


def test_export_records_the_steps_each_stage_reached(trained):
    from sdgen.train.continue_from import read_training_record
    from sdgen.train.embedded import LatentCache

    assert read_training_record(trained / "model") == {"autoencoder": 2, "decoder": 2, "clip": 2, "unet": 3,
                                                       "tiny_decoder": 2}
    factor = json.loads((trained / "model" / "vae" / "config.json").read_text())["scaling_factor"]
    assert LatentCache.recorded_scaling_factor(trained / "run" / "latents") == factor != 1.0


def test_decoder_stage_changes_the_decoder_only_and_ships(trained):
    """The encoder stays as the autoencoder stage left it (the U-Net's latents do not move); the
    exported VAE is the fine-tuned one."""
    from sdgen.train.checkpoint import load_checkpoint

    before = load_checkpoint(trained / "run" / "autoencoder" / "checkpoint.pt")["model"]
    after = load_checkpoint(trained / "run" / "decoder" / "checkpoint.pt")["model"]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("decoder.", "post_quant_conv.")) for name in changed)
    shipped = sdgen.load(trained / "model").vae.state_dict()
    name = sorted(changed)[0]
    assert torch.allclose(shipped[name].float(), after[name], atol=1e-3)
    assert not torch.allclose(shipped[name].float(), before[name], atol=1e-6)


def test_a_recipe_without_a_decoder_section_skips_that_stage(trained, tmp_path, capsys):
    config = tmp_path / "no-decoder.toml"
    config.write_text(TINY_RECIPE.replace("[decoder]\nsteps = 2\nbatch_size = 4\nlr = 1e-3\n", ""))
    assert "[decoder]" not in config.read_text()
    run_training("decoder", config_path=str(config), run_dir=str(tmp_path / "run"))
    assert "no [decoder] section" in capsys.readouterr().out
    assert not (tmp_path / "run" / "decoder").exists()


def test_tiny_decoder_learns_the_vaes_pictures_and_ships(trained, tmp_path):
    """Distillation: more steps bring the preview decoder's pictures closer to the VAE's for the
    same latents (pairs it was not trained on), and the export carries the trained weights in a
    file the preview loader reads."""
    import shutil

    from sdgen.models.tiny_decoder import folder_tiny_decoder, load_tiny_decoder
    from sdgen.train.checkpoint import load_checkpoint
    from sdgen.train.data import SceneStream
    from sdgen.train.embedded import DecodedLatents, Recipe, trained_vae
    from sdgen.train.evaluate import psnr_db

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run, ignore=shutil.ignore_patterns("tiny_decoder"))
    recipe = Recipe.load(trained / "tiny.toml")
    factor = json.loads((trained / "model" / "vae" / "config.json").read_text())["scaling_factor"]
    unseen = DecodedLatents.build(tmp_path / "unseen", trained_vae(recipe, run), SceneStream({"size": 32, "seed": 77}),
                                  16, factor)

    def psnr(steps: int) -> float:
        run_training("tiny_decoder", config_path=str(trained / "tiny.toml"), run_dir=str(run), steps=steps)
        from sdgen.models.tiny_decoder import TinyDecoder
        from sdgen.train.embedded import tiny_decoder_config

        decoder = TinyDecoder(tiny_decoder_config(recipe))
        decoder.load_state_dict(load_checkpoint(run / "tiny_decoder" / "checkpoint.pt")["model"])
        with torch.no_grad():
            return float(np.mean(psnr_db(decoder(unseen.latents.float()), unseen.pictures)))

    early, late = psnr(2), psnr(60)
    assert late > early + 3, (early, late)

    shipped = load_tiny_decoder(folder_tiny_decoder(trained / "model"))
    assert shipped.upscale == 4 and shipped.cfg.channels == (16, 16, 16)
    state = load_checkpoint(trained / "run" / "tiny_decoder" / "checkpoint.pt")["model"]
    assert all(torch.allclose(shipped.state_dict()[k].float(), v, atol=1e-3) for k, v in state.items())


def test_tiny_decoder_stages_must_match_the_latent_factor(trained, tmp_path):
    from sdgen.errors import UserError

    config = tmp_path / "wrong.toml"
    config.write_text(TINY_RECIPE.replace("blocks = [1, 1, 1]", "blocks = [1, 1, 1, 1]"))
    with pytest.raises(UserError, match="4x latents need 3"):
        run_training("tiny_decoder", config_path=str(config), run_dir=str(tmp_path / "run"))


def test_a_new_run_continues_from_the_exported_model(trained, tmp_path, monkeypatch):
    """A machine with the package but not the run: every stage starts from the export's weights
    at its recorded step, so only the U-Net's extra steps are trained."""
    import tomllib

    from sdgen.train.checkpoint import load_checkpoint
    from sdgen.train.embedded import LatentCache

    config = tmp_path / "longer.toml"
    config.write_text((trained / "tiny.toml").read_text().replace("steps = 3\n", "steps = 5\n"))
    assert tomllib.loads(config.read_text())["unet"]["steps"] == 5
    run = tmp_path / "run"
    calls = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    run_training("unet", config_path=str(config), run_dir=str(run), init_from=str(trained / "model"))

    assert load_checkpoint(run / "autoencoder" / "checkpoint.pt")["step"] == 2
    assert len(calls) == 2  # steps 4 and 5 trained, 1 to 3 taken from the export
    assert load_checkpoint(run / "unet" / "checkpoint.pt")["step"] == 5
    # the U-Net goes on with the latent scale it was trained with, not one recomputed here
    shipped_factor = json.loads((trained / "model" / "vae" / "config.json").read_text())["scaling_factor"]
    assert LatentCache.recorded_scaling_factor(run / "latents") == shipped_factor
    exported = sdgen.load(trained / "model").unet.state_dict()
    continued = load_checkpoint(run / "unet" / "checkpoint.pt")["model"]
    assert any(not torch.equal(continued[k], exported[k].float()) for k in exported)


def test_continuing_never_replaces_a_runs_own_checkpoint(trained):
    from sdgen.train.continue_from import seed_run

    before = (trained / "run" / "unet" / "checkpoint.pt").read_bytes()
    assert seed_run(trained / "run", trained / "model", {"unet": torch.nn.Linear(1, 1)}) == []
    assert (trained / "run" / "unet" / "checkpoint.pt").read_bytes() == before


def test_continuing_from_a_folder_without_a_record_is_a_user_error(tmp_path):
    from sdgen.errors import UserError
    from sdgen.train.continue_from import seed_run

    with pytest.raises(UserError, match="training.json"):
        seed_run(tmp_path / "run", tmp_path, {"unet": torch.nn.Linear(1, 1)})


def test_the_shipped_model_records_its_training():
    from sdgen.pipelines.loading import embedded_model_path
    from sdgen.train.continue_from import read_training_record

    assert read_training_record(embedded_model_path())["unet"] > 0
