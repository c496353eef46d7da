"""Original single-file key maps and config inference, checked against diffusers' own single-file reader.

A symmetric round trip (ours to original, ours back) would hide a wrong map, so single files
written with our inverse map are read by `StableDiffusionPipeline.from_single_file` (given a
config-only copy of the folder, so it cannot fall back to the folder's weights) and must give
back the original weights exactly; at full size, diffusers' converter functions run on meta
tensors with the real SD 1.5 / 2.1 / XL names. Builders here are shared with the other
checkpoint test files.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reference_clip import text_config, text_model
from reference_models import make_reference_unet, make_reference_vae, tiny_unet_config
from sdgen.checkpoints import read_checkpoint
from sdgen.checkpoints.detect import detect_family, openclip_layers_kept, text_config as infer_text_config
from sdgen.checkpoints.detect import unet_config as infer_unet_config, vae_config as infer_vae_config
from sdgen.checkpoints.ldm_keys import (
    TEXT_ENCODERS, normalize_clip_names, openclip_to_original, openclip_to_transformers, to_original_checkpoint,
    unet_key_map, unet_to_diffusers, unet_to_original, vae_to_diffusers, vae_to_original,
)

# ---------------------------------------------------------------- shared builders


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """vocab.json / merges.txt derived from OpenAI's BPE file as REFERENCE_NOTES.md describes."""
    clip_dir = Path(importlib.util.find_spec("clip").submodule_search_locations[0])
    lines = gzip.open(clip_dir / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + 49152 - 256 - 2]]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


class TinyModel:
    """A tiny SD pipeline of one family: diffusers components, their folder, their expected state dicts."""

    def __init__(self, family: str, root: Path, seed: int = 0) -> None:
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
        from transformers import CLIPTokenizer

        self.family = family
        self.unet = make_reference_unet(family, seed=seed)
        self.vae = make_reference_vae(seed=seed + 1)
        openclip = family in ("sd2", "sdxl_refiner")
        act = "gelu" if openclip else "quick_gelu"
        if family == "sdxl":
            # Widths differ (24 + 40 = the U-Net's 64) as CLIP-L's 768 and bigG's 1280 do: diffusers tells
            # the two encoders of a single file apart by width.
            self.texts = [text_model(text_config(hidden_act="quick_gelu", hidden_size=24), projection=False, seed=seed + 2),
                          text_model(text_config(hidden_act="gelu", hidden_size=40, projection_dim=32), projection=True,
                                     seed=seed + 3)]
        elif family == "sdxl_refiner":
            self.texts = [text_model(text_config(hidden_act="gelu", projection_dim=32), projection=True, seed=seed + 3)]
        else:
            self.texts = [text_model(text_config(hidden_act=act), projection=False, seed=seed + 2)]
        vocab, merges = write_clip_vocab(root / "vocab")
        pad = "<|endoftext|>" if family == "sd1" else "!"  # SD 2.x and XL folders pad with "!"
        tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token=pad)
        common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
        if family == "sd2":
            scheduler = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
        elif family.startswith("sdxl"):
            scheduler = EulerDiscreteScheduler(**common)
        else:
            scheduler = PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
        self.pipeline = self._pipeline(tokenizer, scheduler)
        self.folder = root / family
        self.pipeline.save_pretrained(self.folder, safe_serialization=True)
        self.config_dir = root / f"{family}-configs"  # no weights: a reader cannot fall back on them
        shutil.copytree(self.folder, self.config_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))

    def _pipeline(self, tokenizer, scheduler):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        if self.family == "sdxl":
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.texts[0], text_encoder_2=self.texts[1],
                                             tokenizer=tokenizer, tokenizer_2=tokenizer, unet=self.unet, scheduler=scheduler)
        if self.family == "sdxl_refiner":
            return StableDiffusionXLImg2ImgPipeline(vae=self.vae, text_encoder=None, text_encoder_2=self.texts[0],
                                                    tokenizer=None, tokenizer_2=tokenizer, unet=self.unet,
                                                    scheduler=scheduler, requires_aesthetics_score=True)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.texts[0], tokenizer=tokenizer, unet=self.unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    @property
    def unet_config(self) -> dict:
        return dict(self.unet.config)

    @property
    def vae_config(self) -> dict:
        return dict(self.vae.config)

    def text_states(self) -> list[dict[str, torch.Tensor]]:
        """Text encoder weights in our contract's names (`text_model.` prefix)."""
        return [normalize_clip_names(model.state_dict()) for model in self.texts]

    def original_state(self) -> dict[str, torch.Tensor]:
        """The whole pipeline in the original single-file names, via our inverse map."""
        return to_original_checkpoint(self.family, (self.unet_config, self.unet.state_dict()),
                                      (self.vae_config, self.vae.state_dict()), self.text_states())

    def write_single_file(self, path: Path, extra: dict[str, torch.Tensor] | None = None,
                          metadata: dict[str, str] | None = None) -> Path:
        state = {**self.original_state(), **(extra or {})}
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
        return path


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))[:6]}"
    bad = [k for k in expected if actual[k].shape != expected[k].shape or not torch.equal(actual[k], expected[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def assert_parts_match(parts, model: TinyModel) -> None:
    """Our reader's output equals the diffusers components' own weights, in our contract's names."""
    assert_same_state(parts.unet_state, model.unet.state_dict(), "unet")
    assert_same_state(parts.vae_state, model.vae.state_dict(), "vae")
    assert len(parts.text_encoders) == len(model.texts)
    for (_, state), expected in zip(parts.text_encoders, model.text_states()):
        assert_same_state(state, expected, "text encoder")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, TinyModel]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: TinyModel(family, root) for family in ("sd1", "sd2")}


# ---------------------------------------------------------------- diffusers' single-file reader as the referee


def _from_single_file(model: TinyModel, path: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(model.config_dir), local_files_only=True)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_reference_reader_reads_our_original_files(tiny, tmp_path, family):
    model = tiny[family]
    path = model.write_single_file(tmp_path / f"{family}.safetensors")
    loaded = _from_single_file(model, path)
    assert_same_state(loaded.unet.state_dict(), model.unet.state_dict(), "unet")
    assert_same_state(loaded.vae.state_dict(), model.vae.state_dict(), "vae")
    assert_same_state(normalize_clip_names(loaded.text_encoder.state_dict()), model.text_states()[0], "text")
    # and ours reads the same file the same way
    parts = read_checkpoint(path, config_dir=model.config_dir)
    assert_parts_match(parts, model)
    assert (parts.family, parts.variant) == (family, "base")
    assert parts.prediction == ("v" if family == "sd2" else "eps")  # from config_dir's scheduler
    assert parts.unet_config == json.loads((model.config_dir / "unet" / "config.json").read_text())


def _full_openclip_tower(model: TinyModel) -> dict[str, torch.Tensor]:
    """What real SD 2.x files hold beyond our export: the unused last resblock and text_projection."""
    config = text_config(hidden_act="gelu", num_hidden_layers=model.texts[0].config.num_hidden_layers + 1)
    deeper = openclip_to_original(normalize_clip_names(text_model(config, projection=False, seed=9).state_dict()))
    last = config.num_hidden_layers - 1
    extra = {f"cond_stage_model.model.{k}": v for k, v in deeper.items() if k.startswith(f"transformer.resblocks.{last}.")}
    width = config.hidden_size
    extra["cond_stage_model.model.text_projection"] = torch.randn(width, width)
    return extra


def test_sd2_full_openclip_tower_drops_the_last_layer_as_diffusers_does(tiny, tmp_path):
    model = tiny["sd2"]
    path = model.write_single_file(tmp_path / "sd2-full.safetensors", extra=_full_openclip_tower(model))
    loaded = _from_single_file(model, path)
    assert_same_state(normalize_clip_names(loaded.text_encoder.state_dict()), model.text_states()[0], "reference text")
    assert_parts_match(read_checkpoint(path, config_dir=model.config_dir), model)


def test_sd2_layer_rule_without_config_dir(tiny):
    model = tiny["sd2"]
    layers = model.texts[0].config.num_hidden_layers
    exported = {k[len("cond_stage_model.model."):]: v for k, v in model.original_state().items()
                if k.startswith("cond_stage_model.model.")}
    full = {**exported, **{k[len("cond_stage_model.model."):]: v for k, v in _full_openclip_tower(model).items()}}
    # a converter's file (no projection) keeps every layer, the original's whole tower loses its last
    assert openclip_layers_kept(exported, "sd2") == layers
    assert openclip_layers_kept(full, "sd2") == layers
    converted = openclip_to_transformers(full, num_layers=layers, with_projection=False)
    assert_same_state(converted, model.text_states()[0], "text")


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def test_sd1_inference_without_config_dir_matches_folder_configs(tmp_path):
    """SD 1.x rules (8 heads, head size 64 for text) on a tiny model built to satisfy them."""
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**tiny_unet_config("sd1", block_out_channels=(32, 64, 64, 64), norm_num_groups=32,
                                                   cross_attention_dim=64))
    vae = make_reference_vae(block_out_channels=(32, 32, 64, 64), norm_num_groups=32)
    text = text_model(text_config(hidden_size=64, num_attention_heads=1), projection=False)
    state = to_original_checkpoint("sd1", (dict(unet.config), unet.state_dict()), (dict(vae.config), vae.state_dict()),
                                   [normalize_clip_names(text.state_dict())])
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    parts = read_checkpoint(path)
    for key, value in parts.unet_config.items():
        if key not in ("_class_name", "sample_size"):
            assert _plain(value) == _plain(unet.config[key]), key
    for key, value in parts.vae_config.items():
        if key not in ("_class_name", "sample_size"):
            assert _plain(value) == _plain(vae.config[key]), key
    text_cfg = parts.text_encoders[0][0]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "hidden_act"):
        assert text_cfg[key] == getattr(text.config, key), key
    assert parts.family == "sd1" and parts.prediction == "eps" and parts.tokenizer_dirs == [None]
    assert_same_state(parts.unet_state, unet.state_dict(), "unet")


# ---------------------------------------------------------------- the maps at full size, on meta tensors

SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
REAL_UNETS = {  # the published config.json values (SD 1.5, SD 2.1 768-v, SDXL base 1.0, SDXL refiner 1.0)
    "sd1": dict(block_out_channels=[320, 640, 1280, 1280], down_block_types=SD_DOWN, up_block_types=SD_UP,
                layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
                transformer_layers_per_block=1),
    "sd2": dict(block_out_channels=[320, 640, 1280, 1280], down_block_types=SD_DOWN, up_block_types=SD_UP,
                layers_per_block=2, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=1),
    "sdxl": dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    "sdxl_refiner": dict(block_out_channels=[384, 768, 1536, 1536], layers_per_block=2, cross_attention_dim=1280,
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                         attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, use_linear_projection=True,
                         addition_embed_type="text_time", addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=2560),
}
REAL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu")
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, hidden_act="gelu")
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
REAL_TEXT = {"sd1": [CLIP_L], "sd2": [OPENCLIP_H], "sdxl": [CLIP_L, OPENCLIP_BIGG], "sdxl_refiner": [OPENCLIP_BIGG]}


def meta_state(family: str, in_channels: int = 4) -> tuple[dict, dict, list[dict]]:
    """Full-size diffusers / transformers state dicts on the meta device (shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_UNETS[family], in_channels=in_channels)
        vae = AutoencoderKL(**REAL_VAE)
        texts = []
        for settings in REAL_TEXT[family]:
            cls = CLIPTextModelWithProjection if "projection_dim" in settings else CLIPTextModel
            texts.append(normalize_clip_names(cls(CLIPTextConfig(**settings)).state_dict()))
    return (dict(unet.config), unet.state_dict()), (dict(vae.config), vae.state_dict()), texts


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_full_size_maps_agree_with_diffusers_converter(family):
    """Our original names, converted back by diffusers' own functions, give the diffusers names and shapes."""
    from diffusers.loaders import single_file_utils as reference

    unet, vae, texts = meta_state(family)
    flat = to_original_checkpoint(family, unet, vae, texts)
    converted = reference.convert_ldm_unet_checkpoint(flat, unet[0])
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in unet[1].items()}
    converted = reference.convert_ldm_vae_checkpoint(flat, vae[0])
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in vae[1].items()}
    for (kind, prefix), state in zip(TEXT_ENCODERS[family], texts):
        if kind == "clip":
            theirs = reference.convert_ldm_clip_checkpoint(flat)
        else:
            # diffusers reads only `config.hidden_size` of the model it is given (when no projection is stored)
            width = state["text_model.final_layer_norm.weight"].shape[0]
            model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=width))
            theirs = reference.convert_open_clip_checkpoint(model, flat, prefix=prefix)
        theirs = normalize_clip_names(theirs)
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_full_size_detection_and_config_inference(family):
    unet, vae, texts = meta_state(family)
    flat = to_original_checkpoint(family, unet, vae, texts)
    if family == "sd2":  # real SD 2.x files hold the whole OpenCLIP tower: 24 resblocks + text_projection
        deeper = dict(OPENCLIP_H, num_hidden_layers=24)
        _, _, (tower,) = meta_state_text([deeper])
        flat.update({f"cond_stage_model.model.{k}": v for k, v in openclip_to_original(tower).items()})
        flat["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
    assert detect_family(flat) == (family, "base")
    unet_weights = {k[len("model.diffusion_model."):]: v for k, v in flat.items() if k.startswith("model.diffusion_model.")}
    inferred = infer_unet_config(unet_weights, family)
    for key, value in REAL_UNETS[family].items():
        assert inferred[key] == value, key
    vae_weights = {k[len("first_stage_model."):]: v for k, v in flat.items() if k.startswith("first_stage_model.")}
    inferred_vae = infer_vae_config(vae_weights, family)
    for key, value in REAL_VAE.items():
        assert inferred_vae[key] == value, key
    for (kind, prefix), settings in zip(TEXT_ENCODERS[family], REAL_TEXT[family]):
        weights = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if kind == "openclip":
            weights = openclip_to_transformers(weights, num_layers=openclip_layers_kept(weights, family),
                                               with_projection=family.startswith("sdxl"))
        else:
            weights = normalize_clip_names(weights)
        inferred_text = infer_text_config(weights, kind)
        for key, value in settings.items():
            assert inferred_text[key] == value, (kind, key)


def meta_state_text(settings_list: list[dict]) -> tuple[None, None, list[dict]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return None, None, [normalize_clip_names(CLIPTextModel(CLIPTextConfig(**s)).state_dict()) for s in settings_list]


def test_detection_needs_exactly_one_family():
    unet, vae, texts = meta_state("sd1", in_channels=9)
    flat = to_original_checkpoint("sd1", unet, vae, texts)
    assert detect_family(flat) == ("sd1", "inpaint")
    no_text = {k: v for k, v in flat.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ValueError, match="unknown architecture.*text encoders: none"):
        detect_family(no_text)
    with pytest.raises(ValueError, match="no U-Net weights"):
        detect_family({k: v for k, v in flat.items() if not k.startswith("model.diffusion_model.")})
    _, _, (openclip,) = meta_state_text([OPENCLIP_H])
    both = {**flat, **{f"cond_stage_model.model.{k}": v for k, v in openclip_to_original(openclip).items()}}
    with pytest.raises(ValueError, match="unknown architecture"):
        detect_family(both)


def test_unet_map_uses_the_published_sd_names():
    """Spot checks against SD 1.5's original names (upsamplers sit after the attention of a level)."""
    keymap = unet_key_map(dict(REAL_UNETS["sd1"]))
    expected = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
        "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
        "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "mid_block.resnets.1.norm2": "middle_block.2.out_layers.0",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
        "up_blocks.3.resnets.2.conv_shortcut": "output_blocks.11.0.skip_connection",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "time_embedding.linear_2": "time_embed.2",
    }
    for diffusers, original in expected.items():
        assert keymap.to_original(diffusers + ".weight") == original + ".weight"
        assert keymap.to_diffusers(original + ".weight") == diffusers + ".weight"
    assert keymap.to_diffusers("input_blocks.1.0.in_layers.1.weight") is None  # SiLU has no weights


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_round_trip_every_tiny_family(family):
    unet = make_reference_unet(family)
    vae = make_reference_vae()
    config = dict(unet.config)
    original = unet_to_original(unet.state_dict(), config)
    assert all(k.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed", "out.", "label_emb"))
               for k in original)
    assert_same_state(unet_to_diffusers(original, config), unet.state_dict(), "unet")
    vae_original = vae_to_original(vae.state_dict(), dict(vae.config))
    assert vae_original["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in the original
    assert_same_state(vae_to_diffusers(vae_original, dict(vae.config)), vae.state_dict(), "vae")


def test_unknown_keys_are_errors():
    unet = make_reference_unet("sd1")
    original = unet_to_original(unet.state_dict(), dict(unet.config))
    original["input_blocks.99.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected U-Net key 'input_blocks.99"):
        unet_to_diffusers(original, dict(unet.config))
    with pytest.raises(ValueError, match="unexpected OpenCLIP"):
        openclip_to_transformers({"transformer.resblocks.0.strange": torch.zeros(1)}, num_layers=1, with_projection=False)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_inferred_configs_build_our_models(family):
    """The contract with sdgen.models: inferred configs give modules whose state_dict() is the converted one."""
    from sdgen.models.clip_config import CLIPTextConfig
    from sdgen.models.clip import CLIPTextModel
    from sdgen.models.unet import UNet, UNetConfig
    from sdgen.models.vae import AutoencoderKL, VAEConfig

    unet, vae, texts = meta_state(family)
    flat = to_original_checkpoint(family, unet, vae, texts)
    unet_weights = {k[len("model.diffusion_model."):]: v for k, v in flat.items() if k.startswith("model.diffusion_model.")}
    vae_weights = {k[len("first_stage_model."):]: v for k, v in flat.items() if k.startswith("first_stage_model.")}
    unet_cfg, vae_cfg = infer_unet_config(unet_weights, family), infer_vae_config(vae_weights, family)
    with torch.device("meta"):
        ours = UNet(UNetConfig.from_diffusers(unet_cfg))
        assert _shapes(ours.state_dict()) == _shapes(unet_to_diffusers(unet_weights, unet_cfg))
        ours = AutoencoderKL(VAEConfig.from_diffusers(vae_cfg))
        assert _shapes(ours.state_dict()) == _shapes(vae_to_diffusers(vae_weights, vae_cfg))
        for (kind, _), state in zip(TEXT_ENCODERS[family], texts):
            ours = CLIPTextModel(CLIPTextConfig.from_transformers(infer_text_config(state, kind)))
            assert _shapes(ours.state_dict()) == _shapes(state)
