"""Prompt editing and LoRA tags through the sampling core, against AUTOMATIC1111's behaviour driven by hand.

`[a red boat:a green house:2]` with 4 Euler steps: A1111 conditions denoiser calls 0..2 on the
first text and call 3 on the second (reconstruct_cond_batch over a schedule of 4 steps); here the
reference is k-diffusion with the reference text encoder switching at that call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdgen
from img2img_reference import NEGATIVE, SEED, as_array, assert_close, reference_decode
from kdiffusion_loader import load_kdiffusion
from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.diffusion.noise import ImageNoise
from sdgen.lora import LoraError
from sdgen.pipelines.conditioning import conditioning_schedule
from sdgen.pipelines.infotext import parse_infotext
from sdgen.pipelines.request import GenerationRequest

SIZE, CFG = 32, 7.0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sd1-prompts")
    reference = make_reference_pipeline("sd1", workdir)
    return reference, sdgen.load(save_folder(reference, workdir / "model"))


def _edited_reference(reference, texts_by_call, steps):
    k = load_kdiffusion()
    unet, tokenizer, text_encoder = reference.unet, reference.tokenizer, reference.text_encoder

    def encode(text):
        ids = tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return text_encoder(ids).last_hidden_state

    class UNetAsCompVis(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alphas_cumprod = reference.scheduler.alphas_cumprod

        def apply_model(self, x, t, cond):
            return unet(x, t, encoder_hidden_states=cond).sample

    wrapper = k.external.CompVisDenoiser(UNetAsCompVis(), quantize=False)
    uncond, calls = encode(NEGATIVE), []

    def guided(x, sigma):
        cond = encode(texts_by_call[len(calls)])
        calls.append(sigma)
        with torch.no_grad():
            c, u = wrapper(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond])).chunk(2)
        return u + (c - u) * CFG

    sigmas = wrapper.get_sigmas(steps)
    x = ImageNoise([SEED], (4, SIZE // 8, SIZE // 8)).initial() * sigmas[0]
    with torch.no_grad():
        return k.sampling.sample_euler(guided, x, sigmas, disable=True)


def test_prompt_editing_switches_at_the_step(model):
    reference, pipe = model
    prompt = "[a red boat:a green house:2]"
    result = pipe.generate(prompt=prompt, negative_prompt=NEGATIVE, seed=SEED, steps=4, sampler="Euler",
                           scheduler="uniform", cfg_scale=CFG, width=SIZE, height=SIZE)
    texts = ["a red boat"] * 3 + ["a green house"]
    expected = reference_decode(reference, _edited_reference(reference, texts, 4))
    worst, mean = assert_close(as_array(result.images[0]), expected)
    print(f"prompt editing vs A1111 by hand: max {worst:.3f}/255, mean {mean:.4f}/255")
    plain = pipe.generate(prompt="a red boat", negative_prompt=NEGATIVE, seed=SEED, steps=4, sampler="Euler",
                          scheduler="uniform", cfg_scale=CFG, width=SIZE, height=SIZE)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))
    assert parse_infotext(result.infotexts[0])["Prompt"] == prompt


def test_schedule_counts_second_order_calls_and_hires_passes(model):
    reference, pipe = model
    request = GenerationRequest(prompt="[cat:dog:0.5]", negative_prompt="[x:y:3]", cfg_scale=7.0)
    schedule = conditioning_schedule(pipe, request, SIZE, SIZE, 8)  # Heun, 4 steps: 8 calls
    assert [until for until, _, _ in schedule] == [3, 4, 8]
    hires = conditioning_schedule(pipe, GenerationRequest(prompt="[cat:dog:1.5]"), SIZE, SIZE, 6, first_pass_steps=4)
    assert [until for until, _, _ in hires] == [3, 6]  # halfway through the hires pass
    long = conditioning_schedule(pipe, GenerationRequest(prompt="word " * 100, negative_prompt="short"),
                                 SIZE, SIZE, 4)
    (_, cond, uncond), = long
    assert cond["context"].shape[1] == uncond["context"].shape[1] == 154  # two chunks, the negative padded


def test_lora_tags_are_merged_for_the_run_and_recorded(model, tmp_path):
    reference, pipe = model
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    out_features, in_features = pipe.unet.get_submodule(layer).weight.shape
    generator = torch.Generator().manual_seed(0)
    save_file({f"lora_unet_{layer.replace('.', '_')}.lora_down.weight": torch.randn(2, in_features, generator=generator),
               f"lora_unet_{layer.replace('.', '_')}.lora_up.weight": torch.randn(out_features, 2, generator=generator)},
              str(tmp_path / "detail.safetensors"))
    before = pipe.unet.get_submodule(layer).weight.clone()
    common = dict(negative_prompt=NEGATIVE, seed=SEED, steps=2, sampler="Euler", width=SIZE, height=SIZE)
    with pytest.raises(LoraError, match="--lora-dir"):
        pipe.generate(prompt="a boat <lora:detail:0.8>", **common)
    pipe.lora_dir = tmp_path
    try:
        with_lora = pipe.generate(prompt="a boat <lora:detail:0.8>", **common)
        without = pipe.generate(prompt="a boat", **common)
    finally:
        pipe.lora_dir = None
    assert torch.equal(pipe.unet.get_submodule(layer).weight, before)  # restored bit-exactly
    assert not np.array_equal(np.asarray(with_lora.images[0]), np.asarray(without.images[0]))
    params = parse_infotext(with_lora.infotexts[0])
    assert params["Prompt"] == "a boat <lora:detail:0.8>" and params["Lora hashes"].startswith("detail: ")
    assert "Lora hashes" not in without.infotexts[0]
