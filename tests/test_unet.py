"""Parity of sdgen's U-Net with diffusers' UNet2DConditionModel on tiny random-weight models.

Tolerances: fp32 outputs must agree within 1e-5 * max|reference| (measured: bit-identical, 0.0,
for every variant here). bf16 (random tiny models amplify rounding: diffusers' own bf16 output is
5-10% off its fp32 one, relative rms): ours within 0.1 relative rms of diffusers' bf16 output, and
our error against fp32 at most 1.5x diffusers' own plus 0.01 (measured: identical for SD1 / SDXL;
SD2 differs by 0.025 because we compute attention in fp32 there, as upcast_attention asks).
"""

from __future__ import annotations

import pytest
import torch

from reference_models import UNET_FAMILIES, make_reference_unet, tiny_unet_config, unet_example_inputs
from sdgen.models.unet import UNet, UNetConfig

FP32_RTOL = 1e-5

# (family, overrides) pairs: the SD families plus variants that exercise single features
VARIANTS = [(family, {}) for family in UNET_FAMILIES] + [
    ("sd1", {"in_channels": 9}),  # inpainting: latent + mask + masked-image latent
    ("sd1", {"time_cond_proj_dim": 16}),  # LCM-distilled: guidance embedding added to the time input
    ("generic", {"mid_block_type": None}),
    ("generic", {"layers_per_block": (1, 2), "transformer_layers_per_block": (1, 3), "attention_head_dim": (1, 5)}),
]
VARIANT_IDS = [family + "".join(f"-{k}" for k in overrides) for family, overrides in VARIANTS]


def load_ours(reference: torch.nn.Module) -> UNet:
    """Build our U-Net on the meta device from the reference config and assign its weights."""
    cfg = UNetConfig.from_diffusers(dict(reference.config))
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


def run_reference(reference: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Diffusers forward on the same inputs."""
    added = dict(inputs["added_cond"] or {})
    timestep_cond = added.pop("timestep_cond", None)
    return reference(inputs["x"], inputs["timesteps"], inputs["context"], timestep_cond=timestep_cond,
                     added_cond_kwargs=added or None).sample


def example_inputs(family: str, overrides: dict, size: int = 8, dtype: torch.dtype = torch.float32) -> dict:
    """Random inputs, with a guidance embedding for LCM variants, cast to `dtype`."""
    inputs = unet_example_inputs(family, size=size, **overrides)
    if overrides.get("time_cond_proj_dim"):
        cond = torch.randn(2, overrides["time_cond_proj_dim"], generator=torch.Generator().manual_seed(5))
        inputs["added_cond"] = {"timestep_cond": cond}
    cast = {"x": inputs["x"].to(dtype), "context": inputs["context"].to(dtype), "timesteps": inputs["timesteps"]}
    if inputs["added_cond"] is not None:
        cast["added_cond"] = {k: v.to(dtype) if k != "time_ids" else v for k, v in inputs["added_cond"].items()}
    else:
        cast["added_cond"] = None
    return cast


@pytest.mark.parametrize("family, overrides", VARIANTS, ids=VARIANT_IDS)
def test_state_dict_keys_and_shapes_match(family: str, overrides: dict) -> None:
    reference = make_reference_unet(family, seed=0, **overrides)
    with torch.device("meta"):
        ours = UNet(UNetConfig.from_diffusers(dict(reference.config)))
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


@pytest.mark.parametrize("family, overrides", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("size", [8, 9])  # 9: odd latent sizes upsample to the skip's size
@torch.no_grad()
def test_fp32_output_equals_diffusers(family: str, overrides: dict, size: int) -> None:
    reference = make_reference_unet(family, seed=1, **overrides)
    ours = load_ours(reference)
    assert not any(p.is_meta for p in ours.parameters())
    assert not list(ours.buffers())  # nothing left on the meta device after assign
    inputs = example_inputs(family, overrides, size=size)  # timesteps 999, 421.37 (fractional)
    expected = run_reference(reference, inputs)
    actual = ours(**inputs)
    scale = expected.abs().max().item()
    assert scale > 1.0, "reference output is near flat: the weight scaling no longer works"
    diff = (actual - expected).abs().max().item()
    print(f"{family} {overrides} size {size}: max abs diff {diff:.3g} (output scale {scale:.3g})")
    assert diff <= FP32_RTOL * scale


def relative_rms(error: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square of `error` relative to that of `reference`."""
    return (error.float().pow(2).mean().sqrt() / reference.float().pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_bf16_output_close_to_diffusers(family: str) -> None:
    # 16x16 latents: at 8x8 the deepest levels are 1x1 / 2x2 and their norms amplify bf16 rounding
    reference = make_reference_unet(family, seed=2)
    ours = load_ours(reference)
    exact = run_reference(reference, example_inputs(family, {}, size=16))
    inputs16 = example_inputs(family, {}, size=16, dtype=torch.bfloat16)
    ref16 = run_reference(reference.to(torch.bfloat16), inputs16).float()
    ours16 = ours.to(torch.bfloat16)(**inputs16)
    assert ours16.dtype == torch.bfloat16
    ours_err, ref_err = relative_rms(ours16 - exact, exact), relative_rms(ref16 - exact, exact)
    between = relative_rms(ours16 - ref16, exact)
    print(f"{family} bf16 relative rms error: ours {ours_err:.3g}, diffusers {ref_err:.3g}, between {between:.3g}")
    assert between <= 0.1
    assert ours_err <= 1.5 * ref_err + 0.01


@torch.no_grad()
def test_scalar_timestep_broadcasts_over_batch() -> None:
    ours = load_ours(make_reference_unet("generic", seed=3))
    inputs = example_inputs("generic", {})
    batched = ours(inputs["x"], torch.tensor([250.5, 250.5]), inputs["context"])
    scalar = ours(inputs["x"], torch.tensor(250.5), inputs["context"])
    assert torch.equal(batched, scalar)


def test_quirk_attention_head_dim_is_the_number_of_heads() -> None:
    ours = load_ours(make_reference_unet("sd2", seed=0))  # attention_head_dim (2, 4, 8, 8)
    heads = [stage.attentions[0].transformer_blocks[0].attn1.heads for stage in ours.down_blocks[:3]]
    assert heads == [2, 4, 8]
    up_heads = [stage.attentions[0].transformer_blocks[0].attn1.heads for stage in ours.up_blocks[1:]]
    assert up_heads == [8, 4, 2]  # up blocks use the reversed list, i.e. the same heads per level
    assert ours.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 8
    # a config naming the heads properly (num_attention_heads) means the same thing
    named = tiny_unet_config("sd2", num_attention_heads=(2, 4, 8, 8), attention_head_dim=64)
    assert UNetConfig.from_diffusers(named).num_heads == (2, 4, 8, 8)


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_config_round_trip_through_diffusers(family: str) -> None:
    from diffusers import UNet2DConditionModel

    cfg = UNetConfig.from_diffusers(tiny_unet_config(family))
    written = cfg.to_diffusers()
    assert UNetConfig.from_diffusers(written) == cfg
    rebuilt = UNet2DConditionModel.from_config(written)
    with torch.device("meta"):
        ours = UNet(cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_sd1_preset_defaults_write_sd15_config() -> None:
    written = UNetConfig().to_diffusers()
    assert written["attention_head_dim"] == 8 and written["layers_per_block"] == 2
    assert written["down_block_types"][-1] == "DownBlock2D"
    assert written["up_block_types"][0] == "UpBlock2D"


@pytest.mark.parametrize("change, message", [
    ({"up_block_types": ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)}, "mirror"),
    ({"down_block_types": ("SimpleCrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)}, "down_block_types"),
    ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"num_class_embeds": 1000}, "num_class_embeds"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"only_cross_attention": True}, "only_cross_attention"),
    ({"transformer_layers_per_block": [[1, 2], [1, 2], [1, 2], [1, 2]]}, "per-block"),
    ({"attention_head_dim": (8, 8)}, "attention_head_dim"),
    ({"block_out_channels": (32, 32, 64)}, "agree"),
    ({"addition_embed_type": "text"}, "addition_embed_type"),
    ({"addition_embed_type": "text_time"}, "addition_time_embed_dim"),
    ({"norm_num_groups": 7}, "norm_num_groups"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"in_channels": "4"}, "in_channels"),
    ({"layers_per_block": 0}, "layers_per_block"),
    ({"attention_head_dim": 0}, "num_heads"),
    ({"attention_head_dim": 64}, "num_heads"),  # more heads than the 32 channels
    ({"transformer_layers_per_block": (1, 0, 1, 1)}, "transformer_depth"),
    ({"norm_num_groups": 0}, "norm_num_groups"),
    ({"cross_attention_dim": 32.5}, "cross_attention_dim"),
])
def test_unsupported_configs_are_rejected_by_name(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers(tiny_unet_config("sd1", **change))


@torch.no_grad()
def test_bad_inputs_raise_actionable_errors() -> None:
    sdxl = load_ours(make_reference_unet("sdxl", seed=0))
    inputs = example_inputs("sdxl", {})
    with pytest.raises(ValueError, match="text_embeds"):
        sdxl(inputs["x"], inputs["timesteps"], inputs["context"])
    with pytest.raises(ValueError, match="context"):
        sdxl(inputs["x"], inputs["timesteps"], inputs["context"][..., :32], inputs["added_cond"])
    with pytest.raises(ValueError, match="x:"):
        sdxl(inputs["x"][:, :3], inputs["timesteps"], inputs["context"], inputs["added_cond"])
    with pytest.raises(ValueError, match="timesteps"):
        sdxl(inputs["x"], torch.tensor([1.0, 2.0, 3.0]), inputs["context"], inputs["added_cond"])
    with pytest.raises(ValueError, match="timesteps"):
        sdxl(inputs["x"], torch.zeros(2, 1), inputs["context"], inputs["added_cond"])
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        sdxl(inputs["x"], inputs["timesteps"], inputs["context"],
             {**inputs["added_cond"], "timestep_cond": torch.zeros(2, 16)})
