"""Textual-inversion embeddings: webui's file formats, folder loading with skips and errors, and the
encoder placing the vectors where the name was.

The expected hidden states come from a copy of the text encoder whose token table has the
embedding's vectors appended as extra rows, fed the new ids in place of the name (tolerance as
test_prompt_encode: 1e-5 * max|reference|; measured 0 since the same model computes both).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdgen.models.clip import CLIPTextModel
from sdgen.prompting.embeddings import EmbeddingError, EmbeddingLibrary, embedding_from_data, read_embedding
from sdgen.prompting.encode import CHUNK_LENGTH, PromptEncoder
from test_prompt_encode import END, START, assert_close, tiny_text_models, tokenizer

WIDTH = 32


def vectors(count: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


class RunsCode:
    """Pickles as a call to os.system: a hostile embedding file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "embeddings"
    (root / "sub").mkdir(parents=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(2, seed=1)},
                "name": "ignored", "step": 500}, root / "webuistyle.pt")
    save_file({"emb_params": vectors(3, seed=2)}, root / "sub" / "safestyle.safetensors")
    torch.save({"<concept>": vectors(1, seed=3)[0]}, root / "conceptstyle.bin")
    save_file({"clip_l": vectors(2, 32, seed=4), "clip_g": vectors(2, 48, seed=5)}, root / "xlstyle.safetensors")
    torch.save({"string_to_param": {"*": vectors(1, 16)}}, root / "narrow.pt")
    (root / "broken.pt").write_bytes(b"\x80\x02garbage")
    (root / "empty.pt").write_bytes(b"")
    torch.save({"string_to_param": {"*": RunsCode(tmp_path / "sentinel")}}, root / "evil.pt")
    torch.save({"string_to_param": {"*": vectors(1)}}, tmp_path / "outside.pt")
    (root / "link.pt").symlink_to(tmp_path / "outside.pt")
    return root


def test_folder_loads_every_format_and_reports_the_rest(folder: Path, tmp_path: Path):
    library = EmbeddingLibrary.load_folder(folder, expected_dim=WIDTH)
    assert sorted(library.embeddings) == ["conceptstyle", "safestyle", "webuistyle"]
    assert library["webuistyle"].num_vectors == 2 and library["webuistyle"].step == 500
    assert torch.equal(library["webuistyle"].vectors_for(), vectors(2, seed=1))
    assert torch.equal(library["safestyle"].vectors_for(), vectors(3, seed=2))
    assert torch.equal(library["conceptstyle"].vectors_for(), vectors(1, seed=3))
    assert sorted(library.skipped) == ["narrow", "xlstyle"]
    assert "expects 32" in library.skipped["narrow"]
    assert sorted(Path(p).name for p in library.errors) == ["broken.pt", "evil.pt", "link.pt"]
    for path, message in library.errors.items():
        assert path in message and "\n" not in message
    assert "os" in library.errors[str(folder / "evil.pt")] or "refused" in library.errors[str(folder / "evil.pt")]
    assert "outside" in library.errors[str(folder / "link.pt")]
    assert not (tmp_path / "sentinel").exists()
    assert library["safestyle"].shorthash == __import__("hashlib").sha256(
        (folder / "sub" / "safestyle.safetensors").read_bytes()).hexdigest()[:12]


def test_sdxl_embeddings_keep_both_encoders(folder: Path):
    library = EmbeddingLibrary.load_folder(folder, expected_dim=32 + 48)
    assert list(library.embeddings) == ["xlstyle"]
    embedding = library["xlstyle"]
    assert embedding.vectors_for("clip_l").shape == (2, 32) and embedding.vectors_for("clip_g").shape == (2, 48)
    with pytest.raises(EmbeddingError, match="clip_l, clip_g"):
        embedding.vectors_for(None)


def test_bad_files_raise_one_line_errors_naming_them(tmp_path: Path):
    bad = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": vectors(1), "+": vectors(1)}}, bad)
    with pytest.raises(EmbeddingError, match="two.pt: string_to_param must hold exactly one"):
        read_embedding(bad)
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "many.safetensors")
    with pytest.raises(EmbeddingError, match="many.safetensors: not a textual-inversion embedding"):
        read_embedding(tmp_path / "many.safetensors")
    with pytest.raises(ValueError, match="shape"):
        embedding_from_data({"emb_params": torch.zeros(2, 3, 4)}, "x")
    with pytest.raises(EmbeddingError, match="no such embeddings folder"):
        EmbeddingLibrary.load_folder(tmp_path / "missing")


def enlarged_model(extra: torch.Tensor) -> CLIPTextModel:
    """Our text encoder with `extra` appended to its token table (ids 49408, 49409, ...)."""
    base = tiny_text_models()[1]
    model = CLIPTextModel(replace(base.config, vocab_size=base.config.vocab_size + extra.shape[0])).eval()
    state = dict(base.state_dict())
    key = "text_model.embeddings.token_embedding.weight"
    state[key] = torch.cat([state[key], extra])
    model.load_state_dict(state)
    return model


def expected_context(model: CLIPTextModel, tokens: list[int]) -> torch.Tensor:
    ids = [START, *tokens, END] + [END] * (75 - len(tokens))
    with torch.no_grad():
        return model(torch.tensor([ids])).hidden_states


@pytest.mark.parametrize("name", ["webuistyle", "safestyle", "conceptstyle"])
def test_prompt_with_an_embedding_name_feeds_its_vectors(folder: Path, name: str):
    library = EmbeddingLibrary.load_folder(folder, expected_dim=WIDTH)
    encoder = PromptEncoder(tokenizer(), tiny_text_models()[1], library)
    extra = library[name].vectors_for()
    tok = tokenizer()
    new_ids = list(range(49408, 49408 + extra.shape[0]))
    expected = expected_context(enlarged_model(extra), tok.encode("a photo of") + new_ids + tok.encode("on a hill"))
    assert_close(encoder.encode(f"a photo of {name} on a hill"), expected)
    # Without the library the name is ordinary text.
    plain = PromptEncoder(tokenizer(), tiny_text_models()[1]).encode(f"a photo of {name} on a hill")
    assert not torch.allclose(plain, expected)


def test_sdxl_embedding_uses_the_encoder_key(folder: Path):
    library = EmbeddingLibrary.load_folder(folder, expected_dim=80)
    encoder = PromptEncoder(tokenizer(), tiny_text_models()[1], library, embedding_key="clip_l")
    extra = library["xlstyle"].vectors_for("clip_l")
    expected = expected_context(enlarged_model(extra), tokenizer().encode("a") + [49408, 49409])
    assert_close(encoder.encode("a xlstyle"), expected)


def test_embedding_that_does_not_fit_starts_the_next_chunk(folder: Path):
    library = EmbeddingLibrary.load_folder(folder, expected_dim=WIDTH)
    encoder = PromptEncoder(tokenizer(), tiny_text_models()[1], library)
    chunks, _ = encoder.tokenize("cat " * 74 + "safestyle")
    assert len(chunks) == 2
    assert chunks[1].fixes[0][0] == 0 and chunks[1].fixes[0][1].name == "safestyle"
    assert chunks[1].tokens[1:4] == [0, 0, 0] and len(chunks[0].tokens) == CHUNK_LENGTH + 2
    context = encoder.encode("cat " * 74 + "safestyle")
    extra = library["safestyle"].vectors_for()
    expected = expected_context(enlarged_model(extra), [49408, 49409, 49410])
    assert_close(context[:, 77:], expected)


def test_weights_apply_to_embedding_vectors(folder: Path):
    library = EmbeddingLibrary.load_folder(folder, expected_dim=WIDTH)
    encoder = PromptEncoder(tokenizer(), tiny_text_models()[1], library)
    chunks, _ = encoder.tokenize("a (webuistyle:1.4)")
    assert chunks[0].weights[2:4] == [1.4, 1.4]
