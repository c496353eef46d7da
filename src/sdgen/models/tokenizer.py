"""CLIP byte-level BPE tokenizer giving the ids of the original OpenAI tokenizer (Radford et al. 2021).

The original (`clip/simple_tokenizer.py`, the one Stable Diffusion was trained with) cleans the text
(ftfy, HTML unescaped twice, whitespace collapsed, lower case), splits it with one regular expression,
then runs byte-level BPE with `</w>` marking word ends. We do the clean-up and the split in Python with
the same `regex` pattern, and the BPE merges with the `tokenizers` library. The split stays in Python
because `tokenizers`' own regex engine splits a few characters differently from the `regex` module
under IGNORECASE (U+0345 is dropped by the original, some unassigned code points split apart).

transformers' fast `CLIPTokenizer` differs from the original wherever the clean-up matters: it applies
NFC instead of ftfy and never unescapes HTML, so HTML entities (`&amp;`, `&lt;3`), mojibake (`cafÃ©`),
full-width text (`ＡＢＣ`), ligatures (`ﬁ`), curly quotes, control characters and byte-order marks give
other ids there; its lower-casing ignores the Greek final sigma (`ΟΔΟΣ`); it matches `<|endoftext|>`
inside punctuation runs (`!<|endoftext|>`) and not in upper case, unlike the original's split.
We follow the original.
"""

from __future__ import annotations

import gzip
import html
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import ftfy
import regex
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import BPE

from sdgen.errors import UserError

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
MODEL_MAX_LENGTH = 77
# The published CLIP vocabulary uses the first 49152 - 256 - 2 merges of the BPE file.
CLIP_MERGE_COUNT = 49152 - 256 - 2
# CLIP's vocabulary files are 0.5-3.5 MB (the gzipped merge list 1.3 MB); a file many times that is
# no tokenizer, and reading it whole would take the memory of a hostile or mistaken path.
MAX_FILE_BYTES = 64 * 2**20

_WHITESPACE = regex.compile(r"\s+")
# The original split; special tokens first so they stay whole, then contractions, letter runs,
# single digits and runs of everything else. IGNORECASE is kept as the original has it.
_SPLIT_TAIL = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


class TokenizerError(UserError, ValueError):
    """A vocabulary file or tokenizer folder that cannot be used (a ValueError too, as before)."""


def byte_alphabet() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-character table: printable Latin-1 bytes stand for themselves, the rest
    move to code points 256 and up, so every byte is a visible character BPE can merge."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table  # insertion order is the vocabulary order: printable bytes first


def clean_text(text: str) -> str:
    """The original CLIP text clean-up: ftfy repair, HTML unescaped twice, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def clip_vocabulary(bpe_lines: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of OpenAI CLIP from the lines of `bpe_simple_vocab_16e6.txt`:
    256 byte characters, the same with `</w>`, one token per merge, then start and end (49,408)."""
    merges = [tuple(line.split()) for line in bpe_lines[1 : CLIP_MERGE_COUNT + 1]]
    if len(merges) != CLIP_MERGE_COUNT or any(len(m) != 2 for m in merges):
        raise TokenizerError(f"expected {CLIP_MERGE_COUNT} merge lines of two symbols after the header")
    symbols = list(byte_alphabet().values())
    tokens = symbols + [s + WORD_END for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


class CLIPTokenizer:
    """CLIP BPE tokenizer over any vocabulary/merges pair; ids equal to OpenAI's `SimpleTokenizer`.

    Symbols missing from a (custom) vocabulary are dropped, where the original would fail.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        pad_token: str = END_TOKEN,
        start_token: str = START_TOKEN,
        end_token: str = END_TOKEN,
        model_max_length: int = MODEL_MAX_LENGTH,
        source: str = "the vocabulary",
    ) -> None:
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
            raise TokenizerError(f"{source}: the vocabulary must map token strings to integer ids")
        if len(set(vocab.values())) != len(vocab) or min(vocab.values(), default=-1) < 0:
            raise TokenizerError(f"{source}: token ids must be distinct and non-negative")
        for role, token in (("start", start_token), ("end", end_token), ("pad", pad_token)):
            if token not in vocab:
                raise TokenizerError(f"{source}: the {role} token {token!r} is not in the vocabulary")
        if model_max_length < 2:
            raise ValueError(f"model_max_length must be at least 2 (start and end tokens), got {model_max_length}")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.start_token, self.end_token, self.pad_token = start_token, end_token, pad_token
        self.model_max_length = model_max_length
        try:
            model = BPE(
                self.vocab, self.merges, continuing_subword_prefix="", end_of_word_suffix=WORD_END, fuse_unk=False
            )
        except Exception as error:  # tokenizers raises a bare Exception for bad merges
            raise TokenizerError(f"{source}: {error}") from None
        self._bpe = Tokenizer(model)
        # Words arrive already split; only the byte-to-character mapping is left to do.
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._special = {start_token: vocab[start_token], end_token: vocab[end_token]}
        specials = "|".join(regex.escape(t) for t in self._special)
        self._split = regex.compile(f"{specials}|{_SPLIT_TAIL}", regex.IGNORECASE)
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._byte_of = {c: b for b, c in byte_alphabet().items()}

    @property
    def start_id(self) -> int:
        return self.vocab[self.start_token]

    @property
    def end_id(self) -> int:
        return self.vocab[self.end_token]

    @property
    def pad_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start and end tokens."""
        if not isinstance(text, str):
            raise ValueError(f"the prompt must be a string, got {type(text).__name__}")
        ids: list[int] = []
        words: list[str] = []
        for word in self._split.findall(clean_text(text)):
            special = self._special.get(word)
            if special is None:
                words.append(word)
                continue
            ids += self._encode_words(words)
            ids.append(special)
            words = []
        return ids + self._encode_words(words)

    def _encode_words(self, words: list[str]) -> list[int]:
        if not words:
            return []
        return self._bpe.encode(words, is_pretokenized=True, add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Ids as Stable Diffusion feeds them: `[start] + ids[:max_length-2] + [end]`, then padding."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.model_max_length if max_length is None else max_length
        if length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end tokens), got {length}")
        rows = []
        for text in texts:
            ids = [self.start_id, *self.encode(text)[: length - 2], self.end_id]
            rows.append(ids + [self.pad_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (lower-cased and cleaned as encoded); `</w>` becomes a space."""
        text = "".join(self._id_to_token.get(int(i), "") for i in ids)
        words = (bytes(self._byte_of[c] for c in word if c in self._byte_of) for word in text.split(WORD_END))
        return " ".join(word.decode("utf-8", errors="replace") for word in words).strip()

    # Loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_bpe_file(cls, path: str | Path, **options) -> CLIPTokenizer:
        """Build from OpenAI's gzipped merge list (`bpe_simple_vocab_16e6.txt.gz`)."""
        try:
            text = _read_bytes(Path(path), gzip.open).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError) as error:  # a size error passes through as it is
            raise TokenizerError(f"{path}: not a CLIP BPE merge file ({error})") from None
        try:
            vocab, merges = clip_vocabulary(text.split("\n"))
        except TokenizerError as error:
            raise TokenizerError(f"{path}: not a CLIP BPE merge file ({error})") from None
        return cls(vocab, merges, source=str(path), **options)

    @classmethod
    def default(cls, pad_token: str = END_TOKEN) -> CLIPTokenizer:
        """The OpenAI CLIP tokenizer from the BPE file carried in this package (SD 1.x pads with the
        end token, SD 2.x with `!`)."""
        path = resources.files("sdgen").joinpath("data", "clip_bpe", "bpe_simple_vocab_16e6.txt.gz")
        with resources.as_file(path) as file:
            return cls.from_bpe_file(file, pad_token=pad_token)

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load a diffusers `tokenizer/` folder: vocab.json + merges.txt, or a single tokenizer.json,
        with tokenizer_config.json / special_tokens_map.json giving the special tokens and length."""
        folder = Path(path)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
            source = str(folder / "vocab.json")
        elif (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
            source = str(folder / "tokenizer.json")
        else:
            raise TokenizerError(f"{folder}: no vocab.json + merges.txt or tokenizer.json; is this a tokenizer folder?")
        options = _read_special_tokens(folder)
        return cls(vocab, merges, source=source, **options)

    def save_folder(self, path: str | Path) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json (the form transformers also reads)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self.vocab.items(), key=lambda item: item[1]))
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self.merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": self.start_token,
            "eos_token": self.end_token,
            "unk_token": self.end_token,
            "pad_token": self.pad_token,
            "model_max_length": self.model_max_length,
            "do_lower_case": True,
            "errors": "replace",
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _read_bytes(path: Path, opener=open) -> bytes:
    """The whole file, refused before reading when it is over MAX_FILE_BYTES; the read itself is
    bounded too, so a gzip file cannot inflate to gigabytes (nor a file grow meanwhile)."""
    size = Path(path).stat().st_size
    limit = f"a tokenizer file is at most {MAX_FILE_BYTES // 2**20} MB; check the path"
    if size > MAX_FILE_BYTES:
        raise TokenizerError(f"{path}: {size / 2**20:.0f} MB, too large ({limit})")
    with opener(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise TokenizerError(f"{path}: more than {MAX_FILE_BYTES // 2**20} MB of text, too large ({limit})")
    return data


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: not readable JSON ({error})") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional `#version` header, then one `left right` pair per line."""
    try:
        lines = _read_bytes(path).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path}: not a readable text file ({error})") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise TokenizerError(f"{path}: line {number} is not a pair of symbols: {line[:60]!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE model inside a `tokenizers` tokenizer.json (merges as "a b" strings or [a, b] pairs)."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerError(f"{path}: expected a tokenizer.json with a BPE model")
    merges = []
    for merge in model.get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise TokenizerError(f"{path}: merge {merge!r} is not a pair of symbols")
        merges.append((pair[0], pair[1]))
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: the BPE model has no vocabulary")
    # Added tokens (start, end) normally repeat vocabulary entries; keep any that do not.
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            vocab.setdefault(added["content"], added["id"])
    return vocab, merges


def _read_special_tokens(folder: Path) -> dict[str, object]:
    """Special tokens and length from tokenizer_config.json, falling back to special_tokens_map.json."""
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        if (folder / name).is_file():
            data = _read_json(folder / name)
            if not isinstance(data, dict):
                raise TokenizerError(f"{folder / name}: expected a JSON object")
            settings.update({k: v for k, v in data.items() if v is not None})
    options: dict[str, object] = {}
    for key, option in (("bos_token", "start_token"), ("eos_token", "end_token"), ("pad_token", "pad_token")):
        token = settings.get(key)
        if isinstance(token, dict):  # serialised AddedToken
            token = token.get("content")
        if token is not None:
            if not isinstance(token, str):
                raise TokenizerError(f"{folder}: {key} must be a string, got {token!r}")
            options[option] = token
    length = settings.get("model_max_length")
    # transformers writes a huge number (1e30) when no length was set.
    if isinstance(length, (int, float)) and 2 <= length < 1_000_000:
        options["model_max_length"] = int(length)
    return options
