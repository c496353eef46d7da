"""Bad requests through the CLI and the Python API (RELIABILITY.md "Bad requests"): a message naming the field,
exit status 2, nothing loaded or allocated; huge and pathological prompts in bounded time; names
from requests never leave their folder. (`test_request.py` covers the request dataclass itself.)"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

import sdgen
from reference_pipelines import make_reference_pipeline, save_folder
from sdgen.cli import main
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.pipelines.naming import FilenamePatternError, format_name, free_path, pattern_fields, save_images
from sdgen.errors import UserError
from sdgen.prompting.parse import extract_loras, parse_prompt_attention
from sdgen.prompting.schedule import prompt_schedule

PROMPT = "a tranquil lake with the mountains"
MEGABYTE_PROMPT = ("a tranquil lake, (mountains:1.2) [snow] <lora:x:0.5> " * 20000)[:1_000_000]
PATHOLOGICAL = {
    "1 MB prompt": MEGABYTE_PROMPT,
    "10,000 nested parentheses": "(" * 10_000 + "lake" + ")" * 10_000,
    "10,000 nested brackets": "[" * 10_000 + "lake:sea:0.5" + "]" * 10_000,
    "unbalanced brackets": "((([[[{{{lake" * 1000 + ")]}" * 50 + "[a:b:" * 500,
    "alternation and editing soup": "[a|b|[c:d:0.3]|" * 3000,
}
SECONDS = 30  # bounded: each measured at under 5 s here; generous for a busy CI machine


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("requests")
    return save_folder(make_reference_pipeline("sd1", workdir), workdir / "model")


# ---------------------------------------------------------------- CLI: named field, exit 2, nothing loaded


@pytest.mark.parametrize("options, field", [
    (["--width", "100"], "width"),
    (["--width", "0"], "width"),
    (["--height", "-8"], "height"),
    (["--width", "100000"], "width"),
    (["--width", "4096", "--height", "4096"], "pixels"),
    (["--steps", "0"], "steps"),
    (["--steps", "100000"], "steps"),
    (["--n", "100000"], "n must be"),
    (["--batch-size", "1000"], "batch_size"),
    (["--cfg", "nan"], "cfg_scale"),
    (["--cfg", "inf"], "cfg_scale"),
    (["--cfg", "-1"], "cfg_scale"),
    (["--clip-skip", "0"], "clip_skip"),
    (["--seed", "-7"], "seed"),
    (["--sampler", "Euler z"], "Euler a"),  # the message lists the valid names
    (["--scheduler", "fancy"], "Karras"),
])
def test_cli_bad_request_names_the_field_and_loads_nothing(tmp_path, monkeypatch, capsys, options, field):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for an invalid request")

    monkeypatch.setattr(sdgen, "load", no_load)
    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdgen: error:") and err.count("\n") == 1 and field in err
    assert not out.exists()


def test_cli_unknown_model_and_bad_types(tmp_path, capsys):
    assert main(["generate", PROMPT, "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal of a non-number
        main(["generate", PROMPT, "--width", "wide"])
    assert exit_info.value.code == 2 and "--width: invalid int value" in capsys.readouterr().err


def test_cli_huge_prompt_over_the_limit(monkeypatch, capsys):
    monkeypatch.setattr(sdgen, "load", lambda *a, **k: pytest.fail("loaded"))
    assert main(["generate", "a" * (1 << 20) + "b"]) == 2
    assert "prompt is 1048577 characters long; the limit is 1000000" in capsys.readouterr().err


# ---------------------------------------------------------------- Python API


@pytest.mark.parametrize("fields, field", [
    ({"width": 100, "height": 64}, "width"),
    ({"width": 64, "height": 0}, "height"),
    ({"steps": 0}, "steps"),
    ({"cfg_scale": math.nan}, "cfg_scale"),
    ({"cfg_scale": -math.inf}, "cfg_scale"),
    ({"sampler": "nope"}, "Euler a"),
    ({"n": 10**6}, "n must be"),
    ({"hires_scale": 50.0}, "hires_scale"),
    ({"subseed_strength": 2.0}, "subseed_strength"),
])
def test_api_bad_request_allocates_nothing(model_folder, monkeypatch, fields, field):
    pipe = sdgen.load(model_folder)
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the U-Net ran"))
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    arguments = {"prompt": PROMPT, "width": 64, "height": 64, **fields}
    with pytest.raises(UserError, match=field) as error:
        pipe.generate(**arguments)
    assert isinstance(error.value, ValueError)  # RequestError, SamplerNameError: both UserError and ValueError


def test_api_unknown_model():
    with pytest.raises(UserError, match="no such file"):
        sdgen.load("/nonexistent/model.safetensors")


# ---------------------------------------------------------------- pathological prompts


@pytest.mark.parametrize("case", sorted(PATHOLOGICAL))
def test_pathological_prompts_parse_in_bounded_time(case):
    text = PATHOLOGICAL[case]
    tokenizer = CLIPTokenizer.default()
    for name, call in (("attention", lambda: parse_prompt_attention(text)), ("schedule", lambda: prompt_schedule(text, 20)),
                       ("extra networks", lambda: extract_loras(text)), ("tokenizer", lambda: tokenizer([text]))):
        start = time.perf_counter()
        call()
        assert time.perf_counter() - start < SECONDS, f"{name} took too long on the {case}"


def test_megabyte_prompt_generates(model_folder):
    pipe = sdgen.load(model_folder)
    prompt = MEGABYTE_PROMPT.replace("<lora:x:0.5>", "")
    start = time.perf_counter()
    result = pipe.generate(prompt=prompt, negative_prompt=PATHOLOGICAL["unbalanced brackets"], seed=1, steps=1,
                           width=64, height=64)
    assert time.perf_counter() - start < 2 * SECONDS
    assert len(result.images) == 1 and result.infotexts[0].startswith("a tranquil lake")


def test_megabyte_prompt_naming_missing_loras_fails_in_one_line(model_folder):
    from sdgen.lora import LoraError

    pipe = sdgen.load(model_folder)
    start = time.perf_counter()
    with pytest.raises(LoraError) as raised:
        pipe.generate(prompt=MEGABYTE_PROMPT, seed=1, steps=1, width=64, height=64)
    assert time.perf_counter() - start < SECONDS
    message = str(raised.value)
    assert "\n" not in message and len(message) < 300 and "--lora-dir" in message


# ---------------------------------------------------------------- names from requests


@pytest.mark.parametrize("prompt", ["../../../etc/passwd", "/etc/passwd", "..\\..\\x", "%2e%2e%2fx", "CON", "a\x00b",
                                    " . . ", "x" * 1000])
def test_file_names_from_prompts_stay_in_the_output_folder(tmp_path, prompt):
    from PIL import Image

    out = tmp_path / "out"
    infotext = f"{prompt}\nSteps: 2, Seed: 5, Size: 8x8"
    for pattern in ("{prompt}", "{prompt_spaces}-{seed}", "../{prompt_words}", "/abs/{prompt}"):
        stem = format_name(pattern, pattern_fields(infotext, 0, 0))
        assert "/" not in stem and "\\" not in stem and not stem.startswith(".") and len(stem) <= 200
        assert free_path(out, stem, ".png").parent == out
    (path,) = save_images([Image.new("RGB", (8, 8))], [infotext], out, pattern="{prompt}")
    assert path.parent == out and path.exists()
    with pytest.raises(FilenamePatternError, match="unknown filename field"):
        format_name("{home}/{prompt}", {})


def test_lora_tags_in_prompts_cannot_name_paths(tmp_path):
    from sdgen.lora import LoraError, find_lora

    text, references = extract_loras("a lake <lora:../../secret:1> <lora:/etc/passwd:0.5> <lora:%2e%2e%2fx:1>")
    assert text.strip() == "a lake" and len(references) == 3
    folder = tmp_path / "loras"
    folder.mkdir()
    for reference in references:
        with pytest.raises(LoraError):
            find_lora(folder, reference.name)
