"""CLIP towers: parity with transformers' CLIP models on tiny random weights, configs, meta loading.

Tolerance: fp32, max |ours - reference| <= 1e-5 * max(1, max |reference|). Both sides compute the same
sums in a different order (SDPA against transformers' eager matmul attention), which leaves ~1e-7;
a wrong constant (GELU for quick GELU, a missing final norm, pooling at the wrong token) is >= 1e-3.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

import reference_clip as ref
from sdgen.models.clip_config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from sdgen.models.clip import CLIPModel, CLIPTextModel, CLIPVisionModel
from sdgen.models.tokenizer import CLIPTokenizer

RELATIVE_TOLERANCE = 1e-5
MAX_DIFFS: dict[str, float] = {}


def max_diff(name: str, ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape, name
    diff = (ours - reference).abs().max().item()
    MAX_DIFFS[name] = diff
    print(f"{name}: max abs diff {diff:.2e} (reference scale {reference.abs().max().item():.2f})")
    return diff


def assert_close(name: str, ours: torch.Tensor, reference: torch.Tensor) -> None:
    diff = max_diff(name, ours, reference)
    assert diff <= RELATIVE_TOLERANCE * max(1.0, reference.abs().max().item()), f"{name}: {diff:.2e}"


def random_ids(vocab_size: int, eos: int, pad: int, seed: int = 0) -> torch.Tensor:
    """Batch of 3 x 77 ids: start, random tokens, end at different places, then padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size - 2, (3, 77), generator=generator)
    for row, end in enumerate((5, 40, 76)):
        ids[row, 0] = vocab_size - 2
        ids[row, end] = eos
        ids[row, end + 1 :] = pad
    return ids


def ours_from(model: torch.nn.Module, cls: type, config) -> torch.nn.Module:
    ours = cls(config).eval()
    ours.load_state_dict(ref.published_state_dict(model), strict=True)
    return ours


# Text tower ------------------------------------------------------------------------------------

TEXT_CASES = [
    # name, activation, eos id in the config, pad id in the batch, projection
    ("sd1_quick_gelu_legacy_eos", "quick_gelu", 2, 999, False),
    ("sd1_quick_gelu_eos_id", "quick_gelu", 999, 999, True),
    ("sd2_gelu_pad_zero", "gelu", 999, 0, False),
    ("sdxl_gelu_legacy_eos_projection", "gelu", 2, 0, True),
    ("custom_vocab_small_eos_id", "gelu", 7, 7, True),  # end token is not the largest id
]


@pytest.mark.parametrize("name, act, eos, pad, projection", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_tower_matches_transformers(name, act, eos, pad, projection):
    config = ref.text_config(hidden_act=act, eos_token_id=eos)
    reference = ref.text_model(config, projection, seed=len(name))
    ours = ours_from(reference, CLIPTextModel, CLIPTextConfig.from_transformers(ref.config_json(reference)))
    ids = random_ids(1000, eos=999 if eos == 2 else eos, pad=pad)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        inner = reference.text_model if projection else reference
        pooled = inner(ids).pooler_output
        out, skipped = ours(ids), ours(ids, clip_skip=2)
        skip_expected = inner.final_layer_norm(expected.hidden_states[-2])
    assert_close(f"{name} last hidden", out.hidden_states, expected.last_hidden_state)
    assert_close(f"{name} clip_skip=2", skipped.hidden_states, skip_expected)
    assert_close(f"{name} penultimate", out.penultimate, expected.hidden_states[-2])
    assert_close(f"{name} pooled", out.pooled, pooled)
    if projection:
        assert_close(f"{name} text_embeds", out.text_embeds, expected.text_embeds)
    else:
        assert out.text_embeds is None


def test_text_tower_full_vocabulary_with_real_token_ids():
    """Full 49,408 vocabulary, ids from our tokenizer, SD 1.x config conventions (eos id 2)."""
    tokenizer = CLIPTokenizer.default()
    ids = tokenizer(["a photo of an astronaut riding a horse on mars", "", "a cat, (masterpiece:1.2)"])
    for eos in (2, 49407):
        config = ref.text_config(vocab_size=49408, eos_token_id=eos, bos_token_id=49406, num_hidden_layers=2)
        reference = ref.text_model(config, projection=False, seed=1)
        ours = ours_from(reference, CLIPTextModel, CLIPTextConfig.from_transformers(config.to_dict()))
        with torch.no_grad():
            expected, out = reference(ids), ours(ids)
        assert_close(f"full vocab eos={eos} last hidden", out.hidden_states, expected.last_hidden_state)
        assert_close(f"full vocab eos={eos} pooled", out.pooled, expected.pooler_output)


def test_inputs_embeds_equal_ids_and_new_vectors_match_an_enlarged_vocabulary():
    """`inputs_embeds` as transformers' CLIPTextEmbeddings takes them: the ids' own embeddings give the
    same outputs bit for bit; new vectors at some positions equal transformers' model whose token
    table has those vectors appended as new ids (how textual inversion works), and carry gradients."""
    config = ref.text_config(hidden_act="gelu", eos_token_id=999)
    reference = ref.text_model(config, projection=True, seed=4)
    ours = ours_from(reference, CLIPTextModel, CLIPTextConfig.from_transformers(ref.config_json(reference)))
    ids = random_ids(1000, eos=999, pad=0)
    with torch.no_grad():
        plain = ours(ids, clip_skip=2)
        same = ours(ids, clip_skip=2, inputs_embeds=ours.text_model.embeddings.token_embedding(ids))
    for field in ("hidden_states", "penultimate", "pooled", "text_embeds"):
        assert torch.equal(getattr(plain, field), getattr(same, field)), field
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)) * 0.3
    enlarged_config = ref.text_config(vocab_size=1003, hidden_act="gelu", eos_token_id=999, bos_token_id=998)
    enlarged = ref.text_model(enlarged_config, projection=True, seed=4)
    state = reference.state_dict()
    key = "text_model.embeddings.token_embedding.weight"
    enlarged.load_state_dict({**state, key: torch.cat([state[key], vectors])}, strict=True)
    new_ids = ids.clone()
    new_ids[1, 2:5] = torch.tensor([1000, 1001, 1002])  # row 1 ends at 40
    embeds = ours.text_model.embeddings.token_embedding(ids).detach().clone()
    embeds[1, 2:5] = vectors
    embeds.requires_grad_(True)
    out = ours(ids, inputs_embeds=embeds)
    with torch.no_grad():
        expected = enlarged(new_ids, output_hidden_states=True)
    assert_close("inputs_embeds last hidden", out.hidden_states.detach(), expected.last_hidden_state)
    assert_close("inputs_embeds penultimate", out.penultimate.detach(), expected.hidden_states[-2])
    assert_close("inputs_embeds text_embeds", out.text_embeds.detach(), expected.text_embeds)
    out.hidden_states[1].sum().backward()
    assert embeds.grad[1, 2:5].abs().sum() > 0 and not embeds.grad[0].any()  # rows do not mix
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        ours(ids, inputs_embeds=embeds[:, :10])


def test_tolerance_catches_a_wrong_activation():
    config = ref.text_config(hidden_act="quick_gelu")
    reference = ref.text_model(config, projection=False)
    wrong = dataclasses.replace(CLIPTextConfig.from_transformers(config.to_dict()), hidden_act="gelu")
    ours = ours_from(reference, CLIPTextModel, wrong)
    ids = random_ids(1000, eos=999, pad=999)
    with torch.no_grad():
        diff = max_diff("gelu instead of quick_gelu", ours(ids).hidden_states, reference(ids).last_hidden_state)
    assert diff > 100 * RELATIVE_TOLERANCE


# Image tower and both towers --------------------------------------------------------------------


@pytest.mark.parametrize("act, projection", [("quick_gelu", True), ("gelu", False)])
def test_vision_tower_matches_transformers(act, projection):
    config = ref.vision_config(hidden_act=act)
    reference = ref.vision_model(config, projection)
    ours = ours_from(reference, CLIPVisionModel, CLIPVisionConfig.from_transformers(ref.config_json(reference)))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
        pooled = (reference.vision_model if projection else reference)(pixels).pooler_output
        out = ours(pixels)
    assert_close(f"vision {act} last hidden", out.hidden_states, expected.last_hidden_state)
    assert_close(f"vision {act} penultimate", out.penultimate, expected.hidden_states[-2])
    assert_close(f"vision {act} pooled", out.pooled, pooled)
    if projection:
        assert_close(f"vision {act} image_embeds", out.image_embeds, expected.image_embeds)


def test_clip_model_similarity_matches_transformers():
    reference = ref.clip_model(ref.text_config(), ref.vision_config())
    ours = ours_from(reference, CLIPModel, CLIPConfig.from_transformers(reference.config.to_dict()))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ids = random_ids(1000, eos=999, pad=999)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels)
        logits = ours.image_text_similarity(pixels, ids)
        text, image = ours.encode_text(ids).text_embeds, ours.encode_image(pixels).image_embeds
    assert logits.shape == (2, 3)
    assert_close("clip logits_per_image", logits, expected.logits_per_image)
    assert_close("clip text_embeds", torch.nn.functional.normalize(text, dim=-1), expected.text_embeds)
    assert_close("clip image_embeds", torch.nn.functional.normalize(image, dim=-1), expected.image_embeds)


# Configs ---------------------------------------------------------------------------------------

SD15_TEXT_ENCODER = {  # the config.json of SD 1.5's text_encoder folder (transformers 4.x era)
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "vocab_size": 49408,
}
SDXL_TEXT_ENCODER_2 = {**SD15_TEXT_ENCODER, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                       "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                       "num_hidden_layers": 32, "projection_dim": 1280}


def test_config_reads_published_text_encoder_configs():
    sd15 = CLIPTextConfig.from_transformers(SD15_TEXT_ENCODER)
    assert (sd15.hidden_size, sd15.num_layers, sd15.num_heads, sd15.projection_dim) == (768, 12, 12, None)
    assert sd15.pools_at_largest_id and sd15.hidden_act == "quick_gelu"
    sdxl = CLIPTextConfig.from_transformers(SDXL_TEXT_ENCODER_2)
    assert (sdxl.hidden_size, sdxl.num_layers, sdxl.projection_dim, sdxl.hidden_act) == (1280, 32, 1280, "gelu")


def test_config_round_trips_through_transformers():
    for config in (CLIPTextConfig.from_transformers(SD15_TEXT_ENCODER), CLIPTextConfig(num_layers=2, projection_dim=8)):
        written = config.to_transformers()
        assert CLIPTextConfig.from_transformers(written) == config
        rewritten = transformers.CLIPTextConfig(**written).to_dict() | {"architectures": written["architectures"]}
        assert CLIPTextConfig.from_transformers(rewritten) == config
    vision = CLIPVisionConfig(image_size=64, patch_size=16, projection_dim=32)
    assert CLIPVisionConfig.from_transformers(vision.to_transformers()) == vision
    both = CLIPConfig(CLIPTextConfig(num_layers=2), CLIPVisionConfig(num_layers=2), projection_dim=16)
    assert CLIPConfig.from_transformers(both.to_transformers()) == both
    assert CLIPConfig.from_transformers(transformers.CLIPConfig(**both.to_transformers()).to_dict()) == both


def test_state_dict_keys_match_transformers_published_names():
    reference = ref.text_model(ref.text_config(), projection=True)
    ours = CLIPTextModel(CLIPTextConfig.from_transformers(ref.config_json(reference)))
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())
    both = ref.clip_model(ref.text_config(), ref.vision_config())
    ours_both = CLIPModel(CLIPConfig.from_transformers(both.config.to_dict()))
    assert sorted(ours_both.state_dict()) == sorted(both.state_dict())


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"hidden_size": 30}, "num_heads"),
        ({"model_type": "bert"}, "model_type"),
        ({"num_hidden_layers": 0}, "num_layers"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"layer_norm_eps": -1.0}, "layer_norm_eps"),
    ],
)
def test_bad_config_values_raise(change, field):
    with pytest.raises(ValueError, match=field):
        CLIPTextConfig.from_transformers({**SD15_TEXT_ENCODER, **change})


# Loading ---------------------------------------------------------------------------------------


def test_meta_device_build_then_assign_load():
    reference = ref.clip_model(ref.text_config(), ref.vision_config())
    config = CLIPConfig.from_transformers(reference.config.to_dict())
    with torch.device("meta"):
        ours = CLIPModel(config)
    assert all(p.is_meta for p in ours.parameters()) and not list(ours.buffers())
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    ids = random_ids(1000, eos=999, pad=999)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close("meta-built logits", ours.image_text_similarity(pixels, ids),
                     reference(input_ids=ids, pixel_values=pixels).logits_per_image)


def test_old_position_ids_buffers_are_ignored():
    reference = ref.text_model(ref.text_config(), projection=False)
    state = ref.published_state_dict(reference)
    state["text_model.embeddings.position_ids"] = torch.arange(77.0)[None] * 0.999  # damaged, as some merges have
    ours = CLIPTextModel(CLIPTextConfig.from_transformers(reference.config.to_dict()))
    ours.load_state_dict(state, strict=True)
    vision = ref.vision_model(ref.vision_config(), projection=False)
    state = ref.published_state_dict(vision) | {"vision_model.embeddings.position_ids": torch.arange(17)[None]}
    CLIPVisionModel(CLIPVisionConfig.from_transformers(vision.config.to_dict())).load_state_dict(state, strict=True)


def test_bad_inputs_raise_value_error():
    config = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2)
    text = CLIPTextModel(config)
    with pytest.raises(ValueError, match="clip_skip"):
        text(torch.zeros(1, 77, dtype=torch.long), clip_skip=3)
    with pytest.raises(ValueError, match="positions"):
        text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        text(torch.zeros(77, dtype=torch.long))
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                              image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="resize"):
        vision(torch.zeros(1, 3, 64, 64))


def test_bfloat16_runs_close_to_float32():
    reference = ref.text_model(ref.text_config(), projection=True)
    ours = ours_from(reference, CLIPTextModel, CLIPTextConfig.from_transformers(ref.config_json(reference)))
    ids = random_ids(1000, eos=999, pad=999)
    with torch.no_grad():
        full = ours(ids).hidden_states
        half = ours.to(torch.bfloat16)(ids).hidden_states.float()
    assert (full - half).abs().max() < 0.05 * full.abs().max()
