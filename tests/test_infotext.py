"""Infotext: AUTOMATIC1111's format, written and read back."""

from sdgen.pipelines.infotext import format_infotext, parse_infotext


def test_format_matches_a1111_layout():
    text = format_infotext("a cat, sitting", "blurry", {
        "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0,
        "Seed": 42, "Size": "512x768", "Model": None, "Lora hashes": "add_detail: 7c6bad76eb54",
    })
    lines = text.split("\n")
    assert lines[0] == "a cat, sitting"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2] == ('Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, '
                        'Size: 512x768, Lora hashes: "add_detail: 7c6bad76eb54"')


def test_negative_line_omitted_when_empty():
    text = format_infotext("x", "", {"Steps": 1, "Seed": 2, "Size": "8x8"})
    assert "Negative prompt" not in text


def test_round_trip_with_multiline_prompt_and_quoted_values():
    params = {"Steps": 25, "Sampler": "Euler a", "CFG scale": 7.5, "Seed": 1234567890,
              "Size": "512x512", "Model": "my, model", "Version": "sdgen 0.1.0"}
    text = format_infotext("line one\nline two: with colon", "neg one\nneg two", params)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two: with colon"
    assert parsed["Negative prompt"] == "neg one\nneg two"
    assert parsed["Model"] == "my, model"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "512"
    assert parsed["Seed"] == "1234567890"


def test_last_line_with_fewer_than_three_pairs_is_prompt():
    parsed = parse_infotext("a photo\nstyle: oil, mood: calm")
    assert parsed["Prompt"] == "a photo\nstyle: oil, mood: calm"
    assert "style" not in parsed
