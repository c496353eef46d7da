"""Prompt editing and a LoRA tag in one generate() call, against the two halves run by hand.

`[a red boat:a green house:0.5] <lora:detail:0.8>` with 4 Euler steps: A1111 merges the LoRA for the
whole run (U-Net and text encoder, so both prompts and the negative prompt are encoded through the
LoRA'd text encoder) and conditions denoiser calls 0..2 on "a red boat", call 3 on "a green house".
The reference is diffusers' U-Net and transformers' text encoder with the kohya update merged by
hand (W += 0.8 * alpha / rank * up @ down), driven by k-diffusion with the conditioning switched at
that call. Compared on the latents (relative tolerance LATENT_TOLERANCE) and on the decoded image
(the whole-image parity tolerance of img2img_reference.assert_close).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import sdgen
from img2img_reference import NEGATIVE, SEED, as_array, assert_close, reference_decode
from reference_pipelines import make_reference_pipeline, save_folder
from test_img2img_prompt_editing import CFG, SIZE, _edited_reference

RANK, ALPHA, MULTIPLIER = 2, 1.5, 0.8
LAYERS = {  # kohya name -> module path, the same in diffusers / transformers and in sdgen
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0":
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
}
STEPS = 4
# Latents compared relative to their scale: float32 sums in another order give ~2e-6; the edit's
# last-step effect is ~1e-4, which whole 8-bit images (3/255 tolerance) would not resolve.
LATENT_TOLERANCE = 1e-5
PROMPT = "[a red boat:a green house:0.5] <lora:detail:0.8>"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("sd1-editing-lora")
    reference = make_reference_pipeline("sd1", workdir)
    pipe = sdgen.load(save_folder(reference, workdir / "model"))
    generator = torch.Generator().manual_seed(11)
    state = {}
    for name, (part, path) in LAYERS.items():
        out_features, in_features = getattr(pipe, part).get_submodule(path).weight.shape
        state[f"{name}.lora_down.weight"] = torch.randn(RANK, in_features, generator=generator) * 0.5
        state[f"{name}.lora_up.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.5
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(state, str(workdir / "detail.safetensors"))
    return reference, pipe, state, workdir


def merged_reference(reference, state: dict[str, torch.Tensor]) -> SimpleNamespace:
    """Copies of the reference U-Net and text encoder with the LoRA merged by hand."""
    parts = {"unet": copy.deepcopy(reference.unet), "text_encoder": copy.deepcopy(reference.text_encoder)}
    with torch.no_grad():
        for name, (part, path) in LAYERS.items():
            module = parts[part]
            if part == "text_encoder" and not hasattr(module, "text_model"):
                path = path.removeprefix("text_model.")  # transformers 5 keeps CLIPTextModel's layers at the top
            weight = module.get_submodule(path).weight
            update = state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"]
            weight += MULTIPLIER * ALPHA / RANK * update
    return SimpleNamespace(unet=parts["unet"], text_encoder=parts["text_encoder"], tokenizer=reference.tokenizer,
                           scheduler=reference.scheduler)


def generate(pipe, prompt: str, steps: int = STEPS):
    return pipe.generate(prompt=prompt, negative_prompt=NEGATIVE, seed=SEED, steps=steps, sampler="Euler",
                         scheduler="uniform", cfg_scale=CFG, width=SIZE, height=SIZE)


def test_prompt_editing_with_a_lora_tag_equals_the_halves_by_hand(model):
    reference, pipe, state, workdir = model
    before = {path: getattr(pipe, part).get_submodule(path).weight.clone() for part, path in LAYERS.values()}
    pipe.lora_dir = workdir
    try:
        first, second = generate(pipe, PROMPT), generate(pipe, PROMPT)
        lora_alone = generate(pipe, "a red boat <lora:detail:0.8>")
    finally:
        pipe.lora_dir = None
    editing_alone = generate(pipe, "[a red boat:a green house:0.5]")
    for part, path in LAYERS.values():  # the original tensors are back, bit for bit
        assert torch.equal(getattr(pipe, part).get_submodule(path).weight, before[path]), path
    assert torch.equal(first.latents, second.latents)
    texts = ["a red boat"] * 3 + ["a green house"]
    expected = _edited_reference(merged_reference(reference, state), texts, STEPS)
    tolerance = LATENT_TOLERANCE * float(expected.abs().max())
    difference = float((first.latents - expected).abs().max())
    worst, mean = assert_close(as_array(first.images[0]), reference_decode(reference, expected))
    print(f"prompt editing + LoRA vs by hand: latents max {difference:.1e} (tolerance {tolerance:.1e}), "
          f"image max {worst:.3f}/255, mean {mean:.4f}/255")
    assert difference <= tolerance
    # Each half alone is far outside that tolerance: the edit acts late (call 3 of 4), the LoRA throughout.
    for name, other in (("LoRA alone", lora_alone), ("editing alone", editing_alone)):
        apart = float((first.latents - other.latents).abs().max())
        print(f"{name}: latents max {apart:.1e} apart")
        assert apart > 10 * tolerance, name
    assert "Lora hashes" in first.infotexts[0] and "Lora hashes" not in editing_alone.infotexts[0]
