"""SDXL behaviour on tiny models: the switch point, micro-conditioning fields, refiner loading and
errors, NaN in a bf16 VAE, interruption, and the command line (`--refiner`, `--rank clip`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sdgen
from img2img_reference import sample_image
from reference_pipelines import make_reference_pipeline, save_folder
from reference_sdxl import make_sdxl_base, make_sdxl_refiner
from sdgen.cli import main
from sdgen.diffusion.samplers import Interrupted
from sdgen.diffusion.schedules import DiscreteSchedule, scaled_linear_alphas_cumprod
from sdgen.pipelines.images import read_image_parameters
from sdgen.pipelines.request import RequestError
from sdgen.pipelines.sdxl import StableDiffusionXL, switch_index
from sdgen.pipelines.sdxl_conditioning import SDXLOptions, parse_crop, parse_size, time_ids
from test_ranking import save_tiny_clip

PROMPT, SIZE = "a tranquil lake with the mountains", 64
FAST = dict(prompt=PROMPT, seed=7, steps=2, sampler="Euler", width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("sdxl-unit")
    base = make_sdxl_base(workdir)
    base.save_pretrained(workdir / "base", safe_serialization=True)
    make_sdxl_refiner(workdir, vae=base.vae).save_pretrained(workdir / "refiner", safe_serialization=True)
    return workdir


@pytest.fixture(scope="module")
def pipes(folders):
    return sdgen.load(folders / "base"), sdgen.load(folders / "refiner")


def _schedule() -> DiscreteSchedule:
    return DiscreteSchedule(scaled_linear_alphas_cumprod(0.00085, 0.012, 1000))


def test_switch_is_the_first_timestep_below_the_cutoff():
    schedule = _schedule()
    uniform = schedule.uniform(10)  # timesteps 999, 888, ..., 111, 0
    assert switch_index(uniform, schedule, 0.8) == 8  # 111 < 200; 222 is not
    assert switch_index(uniform, schedule, 0.5) == 5  # 444 < 500
    exact = torch.cat([schedule.t_to_sigma(torch.tensor([999.0, 700.0, 699.0, 0.0])), torch.zeros(1)])
    assert switch_index(exact, schedule, 0.3) == 2  # 700 is not below 700 (float: (1 - 0.3) * 1000 > 700)
    # the timestep of a sigma is the nearest table entry, as A1111's apply_refiner takes it
    near = torch.cat([schedule.t_to_sigma(torch.tensor([999.0, 199.6, 0.0])), torch.zeros(1)])
    assert switch_index(near, schedule, 0.8) == 2
    for bad in (0, 1, 1.5, -0.2, True, "0.8", math.nan):
        with pytest.raises(RequestError, match="refiner_switch_at"):
            switch_index(uniform, schedule, bad)


def test_time_ids_in_the_unet_order():
    options = SDXLOptions(original_size=(800, 600), crop=(16, 8))
    assert time_ids(options, 1024, 768, 6, negative=False).tolist() == [[600, 800, 16, 8, 768, 1024]]
    assert time_ids(SDXLOptions(), 1024, 768, 6, negative=True).tolist() == [[768, 1024, 0, 0, 768, 1024]]
    assert time_ids(options, 1024, 768, 5, negative=False).tolist() == [[600, 800, 16, 8, 6.0]]
    assert time_ids(options, 1024, 768, 5, negative=True).tolist() == [[600, 800, 16, 8, 2.5]]
    with pytest.raises(ValueError, match="6, the refiner 5"):
        time_ids(options, 64, 64, 4, negative=False)
    assert parse_size("1024x768") == (1024, 768) and parse_crop("64,0") == (64, 0)
    for bad in ("1024", "0x5", "axb"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("field, value", [("original_size", (0, 64)), ("crop", (-1, 0)), ("crop", (1.5, 0)),
                                          ("aesthetic_score", math.inf), ("zero_negative", "yes"),
                                          ("target_size", (64,))])
def test_bad_options_are_refused_by_name(pipes, field, value):
    with pytest.raises(RequestError, match=field):
        pipes[0].generate(**FAST, **{field: value})


def test_default_size_and_micro_conditioning_fields(pipes):
    base, refiner = pipes
    assert isinstance(base, StableDiffusionXL) and base.family == "sdxl" and not base.is_refiner
    assert refiner.is_refiner and refiner.family == "sdxl_refiner"
    plain = base.generate(prompt=PROMPT, seed=7, steps=2, sampler="Euler")
    assert plain.images[0].size == (base.native_size, base.native_size)  # the tiny model's native 64
    cropped = base.generate(**FAST, original_size=(128, 96), crop=(8, 0))
    difference = np.abs(np.asarray(plain.images[0], float) - np.asarray(cropped.images[0], float)).max()
    assert difference > 2  # the size ids reach the U-Net
    assert "SDXL original size: 128x96" in cropped.infotexts[0] and 'SDXL crop: "8,0"' in cropped.infotexts[0]
    assert base.options == SDXLOptions()  # per-call options do not stick
    scored = refiner.img2img(init_image=sample_image(), **FAST, strength=0.5, aesthetic_score=9.0)
    assert "Aesthetic score: 9.0" in scored.infotexts[0]


def test_refiner_by_path_and_its_errors(pipes, folders, tmp_path):
    base, refiner = pipes
    result = base.generate(**FAST, n=2, refiner_checkpoint=str(folders / "refiner"), refiner_switch_at=0.5)
    assert len(result.images) == 2 and "Refiner: refiner [" in result.infotexts[0]
    assert "Refiner switch at: 0.5" in result.infotexts[1]
    assert list(base._refiners) == [str(folders / "refiner")]  # loaded once, kept
    with pytest.raises(RequestError, match="hires fix does not combine"):
        base.generate(**FAST, hires_scale=1.5, refiner=refiner)
    with pytest.raises(RequestError, match="refiner_switch_at"):
        base.generate(**FAST, refiner=refiner, refiner_switch_at=1.0)
    with pytest.raises(RequestError, match="refiner_checkpoint"):
        base.img2img(init_image=sample_image(), **FAST, refiner_checkpoint=str(folders / "refiner"))
    sd1 = sdgen.load(save_folder(make_reference_pipeline("sd1", tmp_path), tmp_path / "sd1"))
    with pytest.raises(RequestError, match="another latent space"):
        base.generate(**FAST, refiner=sd1)


def test_interrupt_stops_before_the_refiner(pipes):
    base, refiner = pipes
    steps = []

    def stop_at_two(image, step, total, denoised):
        steps.append((step, total))
        if step == 1:
            raise Interrupted

    result = base.generate(**{**FAST, "steps": 6}, refiner=refiner, refiner_switch_at=0.5, callback=stop_at_two)
    assert steps == [(0, 6), (1, 6)] and len(result.images) == 1
    seen = []
    base.generate(**{**FAST, "steps": 4}, refiner=refiner, refiner_switch_at=0.5,
                  callback=lambda image, step, total, denoised: seen.append(step))
    assert seen == [0, 1, 2, 3]  # one count across the base's and the refiner's steps


def test_bf16_vae_nan_is_redone_in_float32(folders, monkeypatch):
    pipe = sdgen.load(folders / "base", dtype="bf16")
    for name in ("decode", "encode"):
        method = getattr(pipe.vae, name)

        def nan_in_bf16(x, method=method, name=name):
            out = method(x)
            if next(pipe.vae.parameters()).dtype != torch.bfloat16:
                return out
            return out * math.nan if name == "decode" else type(out)(out.mean * math.nan, out.logvar)

        monkeypatch.setattr(pipe.vae, name, nan_in_bf16)
    result = pipe.img2img(init_image=sample_image(), **FAST, strength=0.5)
    assert next(pipe.vae.parameters()).dtype == torch.float32
    assert np.asarray(result.images[0]).std() > 5  # not a black image


def test_command_line_refiner_and_ranking(folders, tmp_path, capsys):
    clip = save_tiny_clip(tmp_path)[0]
    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", str(folders / "base"), "--refiner", str(folders / "refiner"),
            "--switch-at", "0.5", "--steps", "2", "--sampler", "Euler", "--n", "3", "--seed", "5", "--rank", "clip",
            "--keep", "2", "--clip-model", str(clip), "--out", str(out), "--original-size", "96x96", "--crop", "0,8",
            "--no-zero-negative"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scores = [float(line.split()[0]) for line in lines]
    assert len(lines) == 3 and scores == sorted(scores, reverse=True) and lines[2].endswith("(rejected)")
    kept = sorted(out.glob("*.png"))
    assert len(kept) == 2 and len(list((out / "rejected").glob("*.png"))) == 1
    text = read_image_parameters(kept[0])
    for key in ("Refiner: refiner [", "Refiner switch at: 0.5", "CLIP score: ",
                "SDXL original size: 96x96", "SDXL empty negative: encoded"):
        assert key in text, key
    assert main(["generate", PROMPT, "--model", str(folders / "base"), "--switch-at", "0.5"]) == 2
    assert "--switch-at needs --refiner" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--model", str(folders / "base"), "--keep", "2"]) == 2
    assert "--keep needs --rank clip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--original-size", "big"])


def test_separate_vae_keeps_the_sdxl_scaling(folders):
    pipe = sdgen.load(folders / "base", vae=folders / "refiner" / "vae")
    assert pipe.vae.cfg.scaling_factor == pytest.approx(0.13025) and pipe.vae_name == "vae"
    assert "VAE: vae" in pipe.generate(**FAST).infotexts[0]


def test_sdxl_inpainting_variant_runs(tmp_path):
    """A 9-channel SDXL U-Net (the inpainting variant) takes the mask and masked-image latents as extra input."""
    from img2img_reference import sample_mask
    from reference_models import make_reference_unet

    reference = make_sdxl_base(tmp_path)
    reference.unet = make_reference_unet("sdxl", seed=3, in_channels=9)
    reference.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    pipe = sdgen.load(tmp_path / "inpaint")
    assert pipe.is_inpainting_model
    result = pipe.inpaint(init_image=sample_image(), mask=sample_mask(), **FAST, strength=0.9)
    original, painted = np.asarray(sample_image(), float), np.asarray(result.images[0], float)
    assert np.abs(original - painted)[:4, :4].max() <= 1 and np.abs(original - painted)[16:36, 24:40].max() > 5
    assert pipe.generate(**FAST).images[0].size == (SIZE, SIZE)
