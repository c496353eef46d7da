"""LoRA files: kohya-ss / webui names, original (ldm) names, diffusers and PEFT names, merged into our
U-Net and text encoder, compared with diffusers.

The layer names below are written from the formats' documentation, not from our loader: kohya-ss
sd-scripts names a layer `lora_unet_` / `lora_te_` + its module path with dots as underscores
(networks/lora.py, LoRANetwork), its SDXL files use the original model's paths
(`input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`). diffusers' own converter
(`lora_state_dict`, which reads kohya files) gives the older diffusers layout; the diffusers
reference U-Net gets the same update merged by hand, W += multiplier * alpha / rank * up @ down.
(diffusers' `load_lora_weights` needs `peft`, which is not installed here.)

Tolerances: merged weights within 1e-6 of the expected update; U-Net outputs within
1e-5 * max|reference| of diffusers with the same merge (measured ~1e-6: the same float32 sums).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reference_models import make_reference_unet, unet_example_inputs
from sdgen.lora import LoraError, LoraFile, apply_loras, find_lora, lora_from_state_dict, read_lora
from sdgen.models.unet import UNet, UNetConfig
from test_prompt_encode import tiny_text_models

RANK = 4

# kohya name -> diffusers module path (tiny SD 1.x U-Net: 4 levels, 2 res blocks, conv proj_in)
KOHYA_UNET = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj": "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_2": "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "lora_unet_down_blocks_2_attentions_0_proj_in": "down_blocks.2.attentions.0.proj_in",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v": "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v",
    "lora_unet_up_blocks_3_attentions_0_proj_out": "up_blocks.3.attentions.0.proj_out",
    # LoCon / C3Lier convolutions and the resnets' linear layer
    "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",
    "lora_unet_down_blocks_2_resnets_0_conv_shortcut": "down_blocks.2.resnets.0.conv_shortcut",
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj": "down_blocks.1.resnets.0.time_emb_proj",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "up_blocks.0.upsamplers.0.conv",
}
KOHYA_TEXT = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": "text_model.encoder.layers.1.mlp.fc1",
    "lora_te_text_model_encoder_layers_2_self_attn_out_proj": "text_model.encoder.layers.2.self_attn.out_proj",
}
# Original-model (ldm) names of the same U-Net, as kohya writes them for SDXL.
LDM_UNET = {
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_input_blocks_7_0_skip_connection": "down_blocks.2.resnets.0.conv_shortcut",
    "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
    "lora_unet_middle_block_0_emb_layers_1": "mid_block.resnets.0.time_emb_proj",
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "lora_unet_output_blocks_11_0_out_layers_3": "up_blocks.3.resnets.2.conv2",
}


def load_ours(reference: torch.nn.Module) -> UNet:
    model = UNet(UNetConfig.from_diffusers(dict(reference.config))).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def module_at(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


def kohya_state(model: torch.nn.Module, names: dict[str, str], seed: int = 0,
                alphas: bool = True) -> dict[str, torch.Tensor]:
    """Random kohya-layout weights for the named layers: linear (r, in)/(out, r); conv k x k down, 1x1 up."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, path) in enumerate(names.items()):
        weight = module_at(model, path).weight
        out_features, in_features = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        down_shape = (RANK, in_features, *kernel)
        up_shape = (out_features, RANK, 1, 1) if kernel else (out_features, RANK)
        state[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.3
        if alphas and i % 3:  # every third layer has no alpha: alpha = rank
            state[f"{name}.alpha"] = torch.tensor(float(i % 5 + 1))
    return state


def expected_update(state: dict[str, torch.Tensor], name: str, weight_shape: torch.Size, multiplier: float) -> torch.Tensor:
    down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
    alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else RANK
    if down.ndim == 4:  # kohya's merge_to for k x k: conv2d(down^T, up)^T, here as one einsum
        update = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    else:
        update = up @ down
    return multiplier * alpha / RANK * update.reshape(weight_shape)


def merge_by_hand(model: torch.nn.Module, state: dict[str, torch.Tensor], names: dict[str, str], multiplier: float) -> None:
    with torch.no_grad():
        for name, path in names.items():
            weight = module_at(model, path).weight
            weight += expected_update(state, name, weight.shape, multiplier)


@pytest.fixture(scope="module")
def models():
    reference = make_reference_unet("sd1")
    return reference, load_ours(reference)


def run(model: torch.nn.Module, inputs: dict, diffusers: bool) -> torch.Tensor:
    with torch.no_grad():
        if diffusers:
            return model(inputs["x"], inputs["timesteps"], inputs["context"]).sample
        return model(inputs["x"], inputs["timesteps"], inputs["context"])


def test_kohya_lora_merges_the_expected_update_and_restores_bit_exactly(models, tmp_path: Path):
    reference, ours = models
    text_encoder = tiny_text_models()[1]
    state = {**kohya_state(ours, KOHYA_UNET), **kohya_state(text_encoder, KOHYA_TEXT, seed=1)}
    save_file(state, tmp_path / "detail.safetensors")
    lora = read_lora(tmp_path / "detail.safetensors")
    assert lora.name == "detail" and len(lora.modules) == len(KOHYA_UNET) + len(KOHYA_TEXT)
    assert lora.shorthash == hashlib.sha256((tmp_path / "detail.safetensors").read_bytes()).hexdigest()[:12]

    parameters = {**{f"unet.{n}": p for n, p in ours.named_parameters()},
                  **{f"te.{n}": p for n, p in text_encoder.named_parameters()}}
    before = {n: p.detach().clone() for n, p in parameters.items()}
    inputs = unet_example_inputs("sd1")
    with apply_loras(ours, text_encoder, [(lora, 0.7)]) as handle:
        assert handle.unmatched == {} and handle.skipped == {} and handle.applied == {"detail": len(lora.modules)}
        changed = set()
        for model, names, prefix in ((ours, KOHYA_UNET, "unet"), (text_encoder, KOHYA_TEXT, "te")):
            for name, path in names.items():
                weight = module_at(model, path).weight
                update = weight.detach() - before[f"{prefix}.{path}.weight"]
                expected = expected_update(state, name, weight.shape, 0.7)
                assert (update - expected).abs().max() < 1e-6, name
                changed.add(f"{prefix}.{path}.weight")
        for name, parameter in list(ours.named_parameters(prefix="unet")) + list(text_encoder.named_parameters(prefix="te")):
            if name not in changed:
                assert torch.equal(parameter, before[name]), name
        # Same update merged by hand into diffusers' U-Net: same outputs.
        merged_reference = make_reference_unet("sd1")
        merge_by_hand(merged_reference, state, KOHYA_UNET, 0.7)
        expected = run(merged_reference, inputs, diffusers=True)
        got = run(ours, inputs, diffusers=False)
        diff = (got - expected).abs().max().item()
        print(f"U-Net with LoRA vs diffusers with the same merge: max abs diff {diff:.2e}")
        assert diff <= 1e-5 * max(1.0, expected.abs().max().item())
        assert not torch.allclose(got, run(reference, inputs, diffusers=True), atol=1e-3)
    for name, parameter in list(ours.named_parameters(prefix="unet")) + list(text_encoder.named_parameters(prefix="te")):
        assert parameter is parameters[name], name  # the very same Parameter objects are back
        assert torch.equal(parameter, before[name]), name
    assert torch.equal(run(ours, inputs, diffusers=False), run(reference, inputs, diffusers=True))


def test_diffusers_converter_reads_kohya_keys_to_the_same_layers(models):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    _, ours = models
    text_encoder = tiny_text_models()[1]
    state = {**kohya_state(ours, KOHYA_UNET, seed=2), **kohya_state(text_encoder, KOHYA_TEXT, seed=3)}
    kohya = lora_from_state_dict(state, "kohya")
    converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state))
    # diffusers names some alphas after the down weight; file layouts put `.alpha` after the module.
    for key, alpha in alphas.items():
        if key.endswith(".down.weight.alpha"):
            key = key.removesuffix(".down.weight.alpha").removesuffix("_lora").removesuffix(".lora_linear_layer") + ".alpha"
        converted[key] = torch.tensor(alpha)
    older = lora_from_state_dict(converted, "diffusers")
    # PEFT names of the U-Net part, alpha from the adapter metadata diffusers writes.
    unet_part = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.") and "alpha" not in k}
    peft = {f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet_part).items()}
    assert any(".lora_A." in key for key in peft)
    by_layer = {}
    for lora in (kohya, older):
        with apply_loras(ours, text_encoder, [(lora, 1.0)]) as handle:
            assert handle.unmatched == {}, lora.name
            by_layer[lora.name] = {n: p.detach().clone() for n, p in ours.named_parameters()}
            by_layer[lora.name].update({f"te.{n}": p.detach().clone() for n, p in text_encoder.named_parameters()})
    for name in by_layer["kohya"]:
        assert torch.allclose(by_layer["kohya"][name], by_layer["diffusers"][name], atol=1e-6), name
    # PEFT with a single lora_alpha for the whole U-Net (metadata), as diffusers saves it.
    metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 3.0, "unet.r": RANK})}
    peft_lora = lora_from_state_dict(peft, "peft", metadata)
    before = {path: module_at(ours, path).weight.detach().clone() for path in KOHYA_UNET.values()}
    with apply_loras(ours, None, [(peft_lora, 1.0)]) as handle:
        assert handle.unmatched == {}
        for name, path in KOHYA_UNET.items():
            weight = module_at(ours, path).weight
            # the same up/down weights, alpha 3 for every layer
            update = expected_update({**state, f"{name}.alpha": torch.tensor(3.0)}, name, weight.shape, 1.0)
            assert torch.allclose(weight, before[path] + update, atol=1e-6), name


def test_original_model_names_resolve_through_the_ldm_key_map(models):
    _, ours = models
    state = kohya_state(ours, LDM_UNET, seed=4)
    lora = lora_from_state_dict(state, "ldm")
    before = {path: module_at(ours, path).weight.detach().clone() for path in LDM_UNET.values()}
    with apply_loras(ours, None, [(lora, 0.5)]) as handle:
        assert handle.unmatched == {} and handle.applied == {"ldm": len(LDM_UNET)}
        for name, path in LDM_UNET.items():
            weight = module_at(ours, path).weight
            assert torch.allclose(weight - before[path], expected_update(state, name, weight.shape, 0.5), atol=1e-6), name


def test_separate_multipliers_unmatched_and_unsupported_keys(models):
    _, ours = models
    text_encoder = tiny_text_models()[1]
    state = {**kohya_state(ours, dict(list(KOHYA_UNET.items())[:1])),
             **kohya_state(text_encoder, dict(list(KOHYA_TEXT.items())[:1]))}
    state["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(RANK, 8)
    state["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, RANK)
    state["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"] = torch.zeros(4, 4)
    state["lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight"] = torch.zeros(RANK, 32, 3, 3)
    lora = lora_from_state_dict(state, "mixed")
    assert "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a" in lora.unsupported
    assert any("conv2 (no up weight)" in key for key in lora.unsupported)
    unet_path, te_path = next(iter(KOHYA_UNET.values())), next(iter(KOHYA_TEXT.values()))
    unet_before = module_at(ours, unet_path).weight.detach().clone()
    te_before = module_at(text_encoder, te_path).weight.detach().clone()
    with apply_loras(ours, text_encoder, [(lora, (0.0, 1.0))]) as handle:
        assert "lora_unet_no_such_layer" in handle.unmatched["mixed"]
        assert torch.equal(module_at(text_encoder, te_path).weight, te_before)  # te multiplier 0
        assert not torch.equal(module_at(ours, unet_path).weight, unet_before)


def test_one_by_one_convolution_and_linear_updates_are_interchangeable():
    sd2 = load_ours(make_reference_unet("sd2"))  # linear proj_in / proj_out
    path = "down_blocks.0.attentions.0.proj_in"
    weight = module_at(sd2, path).weight
    down = torch.randn(RANK, weight.shape[1], 1, 1)
    up = torch.randn(weight.shape[0], RANK, 1, 1)
    lora = lora_from_state_dict({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down,
                                 "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up}, "conv-trained")
    before = weight.detach().clone()
    with apply_loras(sd2, None, [(lora, 1.0)]):
        assert torch.allclose(module_at(sd2, path).weight - before, up[:, :, 0, 0] @ down[:, :, 0, 0], atol=1e-6)


def test_bad_lora_files(tmp_path: Path):
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "model.safetensors")
    with pytest.raises(LoraError, match="model.safetensors: no LoRA layers found"):
        read_lora(tmp_path / "model.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 2)},
              tmp_path / "bad.safetensors")
    with pytest.raises(LoraError, match="do not multiply"):
        read_lora(tmp_path / "bad.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(LoraError, match="broken.pt"):
        read_lora(tmp_path / "broken.pt")

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'sentinel'}",)

    torch.save({"lora_unet_x.alpha": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(LoraError, match="refused"):
        read_lora(tmp_path / "evil.pt")
    assert not (tmp_path / "sentinel").exists()


def test_find_lora_never_leaves_its_folder(tmp_path: Path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, folder / "styles" / "detail.safetensors")
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, folder / "detail.pt")
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, tmp_path / "secret.safetensors")
    (folder / "linked.safetensors").symlink_to(tmp_path / "secret.safetensors")
    assert find_lora(folder, "detail") == folder / "detail.pt"  # the top folder is listed first
    for hostile in ("../secret", "/etc/passwd", str(tmp_path / "secret"), "%2e%2e%2fsecret", "..", "a\0b", ""):
        with pytest.raises(LoraError):
            find_lora(folder, hostile)
    with pytest.raises(LoraError, match="outside"):
        find_lora(folder, "linked")
    with pytest.raises(LoraError, match="not found.*available: detail, linked"):
        find_lora(folder, "missing")


def test_restore_is_idempotent_and_lora_file_can_be_built_in_code(models):
    _, ours = models
    lora = LoraFile("empty", {})
    handle = apply_loras(ours, None, [(lora, 1.0)])
    handle.restore()
    handle.restore()
    assert handle.applied == {}
