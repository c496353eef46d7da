"""CLIP tokenizer: ids equal to OpenAI's original SimpleTokenizer, folder loading, padding."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import sdgen.models.tokenizer as tokenizer_module
from sdgen.errors import UserError
from sdgen.models.tokenizer import END_TOKEN, START_TOKEN, CLIPTokenizer, TokenizerError, byte_alphabet

CLIP_DIR = Path(importlib.util.find_spec("clip").origin).parent  # found without importing the package
PROMPT_COUNT = 3200


def load_original_tokenizer():
    """OpenAI's simple_tokenizer.py loaded by path (the clip package __init__ needs torchvision)."""
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", CLIP_DIR / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(CLIP_DIR / "bpe_simple_vocab_16e6.txt.gz"))


@pytest.fixture(scope="module")
def original():
    return load_original_tokenizer()


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.default()


# Prompt generator ------------------------------------------------------------------------------

WORDS = (
    "a photo of an astronaut riding horse on mars cat dog portrait landscape highly detailed "
    "cinematic lighting masterpiece best quality 1girl solo long hair looking at viewer trending "
    "artstation by greg rutkowski octane render unreal engine 4k 8k hdr sharp focus bokeh "
    "watercolor oil painting concept art fantasy sci-fi cyberpunk steampunk don't it's we're "
    "they've i'm you'll he'd ISN'T Rock'n'Roll McDonald's O'Neill ultra-realistic f/1.8 50mm"
).split()
A1111 = [
    "(masterpiece:1.2)", "((best quality))", "[blurry]", "(worst quality:1.4)", "[cat:dog:0.5]",
    "[cat|dog]", "<lora:detail_tweaker:0.8>", "BREAK", "AND", "{red|blue}", "(eyes:0.9)", "\\(text\\)",
    "embedding:easynegative", "score_9, score_8_up", "__wildcard__", "(a, b:1.1)", "(((",
]
ENTITIES = ["&amp;", "&lt;3", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&eacute;",
            "&hellip;", "&copy;", "&#8217;", "&amp;lt;", "&ndash;", "&notanentity;", "&#0;", "&lt;|endoftext|&gt;"]
MOJIBAKE = ["cafÃ©", "Ã¼ber", "naÃ¯ve", "donâ€™t", "â€œquotedâ€\x9d", "SchrÃ¶dinger", "Ã‰cole", "ðŸ˜€",
            "CrÃ¨me brÃ»lÃ©e", "â€”", "Ã±andÃº"]
WIDE = ["ＡＢＣ", "ｈｅｌｌｏ　ｗｏｒｌｄ", "１２３", "！？", "（ｍａｓｔｅｒｐｉｅｃｅ：１．２）", "ｶﾀｶﾅ"]
LIGATURES = ["ﬁne", "ﬂower", "æsthetic", "œuvre", "ﬀ", "ĳ", "ﬆ", "Ǆ", "ǈ"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "🔥🔥", "✨", "🐱", "🏳️‍🌈", "☕", "🎉"]
CJK = ["猫", "東京タワー", "한국어", "中文提示词", "かわいい", "美しい風景", "繁體字", "𠀋𡈽"]
ACCENTS = ["é", "ñ", "Ü", "e\u0301", "Å", "ø", "Ł", "ç", "İstanbul", "straße", "ΟΔΟΣ", "Ωmega", "ǅ", "ﬃ"]
NUMBERS = ["1girl", "8k", "3.14", "1,000", "½", "²", "٣", "Ⅻ", "⑤", "2024-01-01", "0x1F", "1e-5", "৭", "ⅷ"]
SPACES = [" ", "  ", "\t", "\n", "\u00a0", "\u3000", "\u200b", "\r\n", "\u2028", "\x0b", "\u202f"]
ODD = ["<|endoftext|>", "!<|startoftext|>", "<|ENDOFTEXT|>", "'s", "'", "’", "‘quoted’", "“smart”", "--", "...",
       "\x00", "\x1b[31m", "\ufeff", "\ud7ff", "\U0001d400\U0001d401", "🄰", "ⓐ", "\u0345", "ǰ", "ŉ", "ß"]
RANDOM_RANGES = [(0x20, 0x7F), (0xA0, 0x250), (0x370, 0x530), (0x590, 0x700), (0x900, 0xE00), (0x1E00, 0x2000),
                 (0x2000, 0x2C00), (0x3000, 0x3100), (0x4E00, 0x4F00), (0xAC00, 0xAD00), (0xFB00, 0xFB50),
                 (0xFE30, 0xFFF0), (0x1F300, 0x1FAFF), (0x1D400, 0x1D800)]
FRAGMENTS = [WORDS, A1111, ENTITIES, MOJIBAKE, WIDE, LIGATURES, EMOJI, CJK, ACCENTS, NUMBERS, ODD]


def random_fragment(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.08:  # a very long word
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(rng.randint(20, 200)))
    if kind < 0.16:  # random code points from many scripts
        low, high = rng.choice(RANDOM_RANGES)
        return "".join(chr(rng.randrange(low, high)) for _ in range(rng.randint(1, 8)))
    if kind < 0.22:
        return str(rng.choice([rng.randint(0, 10**9), rng.random() * 100, -rng.randint(1, 99)]))
    word = rng.choice(rng.choice(FRAGMENTS))
    return word.upper() if rng.random() < 0.1 else word


def generated_prompts(count: int, seed: int = 0) -> list[str]:
    """Seeded mix of ordinary, A1111-style and hostile prompts."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        parts = [random_fragment(rng) for _ in range(rng.randint(1, 24))]
        joints = [rng.choice([" ", " ", " ", ", ", ",", "", rng.choice(SPACES)]) for _ in parts]
        prompts.append("".join(j + p for j, p in zip(joints, parts)))
    return prompts


# Equality with the original --------------------------------------------------------------------


def test_ids_equal_original_on_generated_prompts(original, ours):
    prompts = generated_prompts(PROMPT_COUNT)
    mismatches = [p for p in prompts if ours.encode(p) != original.encode(p)]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[:3]!r}"


@pytest.mark.parametrize(
    "text",
    [
        "a photo of an astronaut riding a horse on mars",
        "", "   ", "&amp;&lt;3", "cafÃ©", "ＡＢＣ", "ﬁne", "👨‍👩‍👧", "東京タワー", "e\u0301", "İ",
        "<|endoftext|>", "!<|endoftext|>", "a<|startoftext|>b", "x" * 500, "(masterpiece:1.2), BREAK",
    ],
)
def test_ids_equal_original_on_edge_cases(original, ours, text):
    assert ours.encode(text) == original.encode(text)


def test_decode_round_trip(ours):
    assert ours.decode(ours.encode("A photo of a Cat, café")) == "a photo of a cat , café"


# Layout of the batch tensor ------------------------------------------------------------------


def test_batch_layout_sd1_padding(ours, original):
    ids = ours(["a cat", "a dog on a skateboard"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    body = original.encode("a cat")
    assert ids[0, : len(body) + 2].tolist() == [49406, *body, 49407]
    assert (ids[0, len(body) + 2 :] == 49407).all()
    assert (ours.start_id, ours.end_id, ours.pad_id, ours.vocab_size) == (49406, 49407, 49407, 49408)


def test_sd2_pads_with_exclamation_mark():
    tokenizer = CLIPTokenizer.default(pad_token="!")
    ids = tokenizer("a cat")
    assert tokenizer.pad_id == 0
    assert ids[0].tolist()[:4] == [49406, 320, 2368, 49407] and (ids[0, 4:] == 0).all()


def test_truncation_keeps_start_and_end(ours, original):
    text = " ".join(f"word{i}" for i in range(100))
    ids = ours(text)[0].tolist()
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:76] == original.encode(text)[:75]
    assert ours(text, max_length=10).shape == (1, 10)
    with pytest.raises(ValueError, match="max_length"):
        ours(text, max_length=1)
    with pytest.raises(ValueError, match="string"):
        ours([text, None])
    assert ours([]).shape == (0, 77)


# Folder forms ----------------------------------------------------------------------------------


def write_vocab_files(tokenizer: CLIPTokenizer, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps(tokenizer.vocab), encoding="utf-8")
    merges.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in tokenizer.merges) + "\n", encoding="utf-8")
    return vocab, merges


@pytest.mark.parametrize("pad_token, pad_id", [(END_TOKEN, 49407), ("!", 0)])
def test_from_folder_written_by_transformers(tmp_path, ours, original, pad_token, pad_id):
    """transformers 5 save_pretrained writes tokenizer.json + tokenizer_config.json only."""
    from transformers import CLIPTokenizer as ReferenceTokenizer

    vocab, merges = write_vocab_files(ours, tmp_path / "hand")
    reference = ReferenceTokenizer(str(vocab), str(merges), pad_token=pad_token)
    reference.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    loaded = CLIPTokenizer.from_folder(tmp_path / "saved")
    assert (loaded.pad_id, loaded.start_id, loaded.end_id, loaded.model_max_length) == (pad_id, 49406, 49407, 77)
    text = "a cat, ﬁne &amp; cafÃ© 😀"
    assert loaded.encode(text) == original.encode(text)
    # On ordinary text transformers agrees, padding included.
    plain = "a photo of an astronaut riding a horse"
    expected = reference(plain, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(loaded(plain), expected)


def test_from_folder_vocab_and_merges_by_hand(tmp_path, ours, original):
    folder = tmp_path / "tokenizer"
    write_vocab_files(ours, folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "pad_token": {"content": "<|endoftext|>", "__type": "AddedToken"}})
    )
    loaded = CLIPTokenizer.from_folder(folder)
    assert loaded.pad_id == 49407  # tokenizer_config.json wins over special_tokens_map.json
    assert loaded.vocab_size == 49408 and loaded.encode("&lt;3 ＡＢＣ") == original.encode("&lt;3 ＡＢＣ")


def test_save_folder_round_trip_and_transformers_reads_it(tmp_path, ours):
    from transformers import CLIPTokenizer as ReferenceTokenizer

    sd2 = CLIPTokenizer.default(pad_token="!")
    sd2.save_folder(tmp_path / "tok")
    loaded = CLIPTokenizer.from_folder(tmp_path / "tok")
    assert loaded.pad_id == 0 and loaded.vocab == sd2.vocab and loaded.merges == sd2.merges
    reference = ReferenceTokenizer.from_pretrained(tmp_path / "tok")
    text = "a red bicycle leaning on a wall"
    expected = reference(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(loaded(text), expected)


def test_small_custom_vocabulary(tmp_path):
    symbols = list(byte_alphabet().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = [("c", "a"), ("ca", "t</w>")]
    for token in ("ca", "cat</w>", START_TOKEN, END_TOKEN):
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab, merges, model_max_length=8)
    assert tokenizer.encode("Cat cat") == [vocab["cat</w>"]] * 2
    assert tokenizer.encode("cab") == [vocab["ca"], vocab["b</w>"]]
    tokenizer.save_folder(tmp_path / "small")
    loaded = CLIPTokenizer.from_folder(tmp_path / "small")
    assert loaded("cat").tolist() == [[vocab[START_TOKEN], vocab["cat</w>"], *[vocab[END_TOKEN]] * 6]]


# Broken vocabularies ---------------------------------------------------------------------------


def test_bad_files_raise_value_error_naming_the_file(tmp_path, ours):
    folder = tmp_path / "broken"
    write_vocab_files(ours, folder)
    (folder / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json"):
        CLIPTokenizer.from_folder(folder)
    (folder / "vocab.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="vocab.json"):
        CLIPTokenizer.from_folder(folder)
    write_vocab_files(ours, folder)
    (folder / "merges.txt").write_text("#version: 0.2\ni n\nthree symbols here\n")
    with pytest.raises(ValueError, match=r"merges.txt: line 3"):
        CLIPTokenizer.from_folder(folder)
    (folder / "merges.txt").write_text("i n\nq zz\n")  # "zz" is not in the vocabulary
    with pytest.raises(ValueError, match="vocab.json"):
        CLIPTokenizer.from_folder(folder)
    (folder / "merges.txt").unlink()
    with pytest.raises(ValueError, match="tokenizer folder"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        CLIPTokenizer.from_folder(folder)
    (tmp_path / "bpe.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bpe.txt.gz"):
        CLIPTokenizer.from_bpe_file(tmp_path / "bpe.txt.gz")
    with pytest.raises(TokenizerError, match="pad token"):
        CLIPTokenizer.default(pad_token="<pad>")


def test_tokenizer_errors_are_user_errors_and_oversized_files_are_refused(tmp_path, ours, monkeypatch):
    assert issubclass(TokenizerError, UserError) and issubclass(TokenizerError, ValueError)
    folder = tmp_path / "huge"
    write_vocab_files(ours, folder)
    with open(folder / "vocab.json", "r+b") as handle:  # sparse: 65 MB on paper, nothing on disk
        handle.truncate(65 * 2**20)
    too_large = r"vocab.json: 65 MB, too large \(a tokenizer file is at most 64 MB"
    with pytest.raises(TokenizerError, match=too_large) as error:
        CLIPTokenizer.from_folder(folder)
    assert "\n" not in str(error.value)
    write_vocab_files(ours, folder)
    with open(folder / "merges.txt", "r+b") as handle:
        handle.truncate(64 * 2**20 + 1)
    with pytest.raises(TokenizerError, match="merges.txt: 64 MB, too large"):
        CLIPTokenizer.from_folder(folder)
    # A small gzip file that inflates past the limit is stopped while reading.
    monkeypatch.setattr(tokenizer_module, "MAX_FILE_BYTES", 2**20)
    bomb = tmp_path / "bomb.txt.gz"
    bomb.write_bytes(gzip.compress(b"a b\n" * 2**20))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(TokenizerError, match="bomb.txt.gz: more than 1 MB of text, too large"):
        CLIPTokenizer.from_bpe_file(bomb)
    write_vocab_files(ours, folder)
    (folder / "tokenizer_config.json").write_bytes(b" " * (2**20 + 1))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: 1 MB, too large"):
        CLIPTokenizer.from_folder(tmp_path / "huge")
