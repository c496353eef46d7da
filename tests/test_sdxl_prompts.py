"""SDXL's prompt language as AUTOMATIC1111 1.10 reads it: emphasis and 75-token chunks with BREAK for
the base (CLIP-L + bigG) and the refiner (bigG), against the reference text encoders (transformers,
tiny random weights, the real CLIP vocabulary) fed chunk ids and weights computed here by hand.

Expected per encoder and chunk (webui's `process_tokens` with the "Original" emphasis): z = the
encoder's penultimate hidden states of `[start] + 75 tokens + [end]` (bigG pads with id 0 after the
first end token, CLIP-L with the end token), then z * weights * mean(z) / mean(z * weights); chunks
concatenated along the sequence axis, encoders along the width; pooled = bigG's projected pooled
output of the first chunk, without emphasis. Tolerance 1e-5 * max(1, max|reference|) (measured
differences are printed; prompts of up to 75 tokens are checked bit-exactly against diffusers in
test_sdxl_parity.py).
"""

from __future__ import annotations

import pytest
import torch

import sdgen
from reference_sdxl import make_sdxl_base, make_sdxl_refiner
from sdgen.pipelines.request import GenerationRequest
from sdgen.prompting.embeddings import Embedding
from sdgen.prompting.encode import PromptEncoder

START, END = 49406, 49407
TOLERANCE = 1e-5
SIZE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("sdxl-prompts")
    base = make_sdxl_base(workdir)
    refiner = make_sdxl_refiner(workdir, vae=base.vae)
    base.save_pretrained(workdir / "base", safe_serialization=True)
    refiner.save_pretrained(workdir / "refiner", safe_serialization=True)
    return base, refiner, sdgen.load(workdir / "base"), sdgen.load(workdir / "refiner")


def pieces_to_chunks(tokenizer, pieces: list) -> list[tuple[list[int], list[float]]]:
    """(tokens, weights) per chunk of 75 from [(text, weight) | "BREAK"], no comma in the text."""
    chunks, tokens, weights = [], [], []
    for piece in pieces:
        if piece == "BREAK":
            chunks.append((tokens, weights))
            tokens, weights = [], []
            continue
        text, weight = piece
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if len(tokens) == 75:
                chunks.append((tokens, weights))
                tokens, weights = [], []
            tokens.append(token)
            weights.append(weight)
    chunks.append((tokens, weights))
    return chunks


def expected_encoding(text_encoders, chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Context (1, 77 * chunks, width) and pooled embedding as webui computes them, by hand."""
    rows, pooled = [], None
    for index, (tokens, weights) in enumerate(chunks):
        ids = [START, *tokens, *[END] * (76 - len(tokens))]
        multipliers = torch.tensor([1.0, *weights, *[1.0] * (76 - len(weights))])[None, :, None]
        width_parts = []
        for encoder, pad in text_encoders:
            padded = ids[:ids.index(END) + 1] + [pad] * (76 - ids.index(END))
            with torch.no_grad():
                out = encoder(torch.tensor([padded]), output_hidden_states=True)
            z = out.hidden_states[-2]
            weighted = z * multipliers
            width_parts.append(weighted * (z.mean() / weighted.mean()))
            if index == 0 and hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        rows.append(torch.cat(width_parts, dim=-1))
    return torch.cat(rows, dim=1), pooled


def base_encoders(base):
    return [(base.text_encoder, END), (base.text_encoder_2, 0)]


def assert_close(ours: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert ours.shape == expected.shape, what
    diff = (ours - expected).abs().max().item()
    print(f"{what}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE * max(1.0, expected.abs().max().item()), what
    return diff


LONG = "a (red:1.3) boat " + "cat " * 80 + "BREAK a [green] house"
LONG_PIECES = [("a ", 1.0), ("red", 1.3), (" boat " + "cat " * 80, 1.0), "BREAK", ("a ", 1.0), ("green", 1 / 1.1),
               (" house", 1.0)]


def test_base_long_prompt_with_emphasis_and_break(models):
    base, _, ours, _ = models
    chunks = pieces_to_chunks(base.tokenizer, LONG_PIECES)
    assert [len(tokens) for tokens, _ in chunks] == [75, 8, 3]
    expected_context, expected_pooled = expected_encoding(base_encoders(base), chunks)
    context, pooled = ours.text.encode(LONG)
    assert context.shape == (1, 3 * 77, 64)
    assert_close(context, expected_context, "base context, 3 chunks")
    assert_close(pooled, expected_pooled, "base pooled (first chunk)")
    # The pooled embedding ignores emphasis; the first chunk alone decides it.
    assert torch.equal(pooled, ours.text.encode("a red boat " + "cat " * 72)[1])


def test_refiner_long_prompt_with_emphasis(models):
    _, refiner, _, ours = models
    chunks = pieces_to_chunks(refiner.tokenizer_2, LONG_PIECES)
    expected_context, expected_pooled = expected_encoding([(refiner.text_encoder_2, 0)], chunks)
    context, pooled = ours.text.encode(LONG)
    assert context.shape == (1, 3 * 77, 32)
    assert_close(context, expected_context, "refiner context, 3 chunks")
    assert_close(pooled, expected_pooled, "refiner pooled (first chunk)")


@pytest.mark.parametrize("zero_negative", [True, False])
def test_negative_prompt_is_padded_with_the_empty_prompt(models, zero_negative):
    base, _, ours, _ = models
    empty = expected_encoding(base_encoders(base), [([], [])])[0]
    blurry = expected_encoding(base_encoders(base), pieces_to_chunks(base.tokenizer, [("blurry", 1.0)]))[0]
    (context, pooled), (negative, negative_pooled) = ours.text.encode_pair(LONG, "blurry", zero_negative)
    assert context.shape == negative.shape == (1, 231, 64)
    assert_close(negative[:, :77], blurry, "negative chunk")
    assert_close(negative[:, 77:154], empty, "negative padding 1")
    assert torch.equal(negative[:, 154:], negative[:, 77:154])
    # An empty negative prompt: zeros for its own chunk and pooled embedding; the padding is the
    # encoded empty prompt (webui pads with `cond_stage_model_empty_prompt`, never zeroed).
    (_, _), (zeroed, zero_pooled) = ours.text.encode_pair(LONG, "", zero_negative)
    assert zeroed.shape == (1, 231, 64)
    assert bool((zeroed[:, :77] == 0).all()) == zero_negative and bool((zero_pooled == 0).all()) == zero_negative
    assert_close(zeroed[:, 77:154], empty, "zeroed negative padding")
    # A long negative prompt pads the prompt instead.
    (short, _), (long_negative, _) = ours.text.encode_pair("a boat", "cat " * 80, zero_negative)
    assert short.shape == long_negative.shape == (1, 154, 64)
    assert_close(short[:, 77:], empty, "prompt padding")


def test_short_prompts_match_the_plain_encoders_bit_for_bit(models):
    _, _, ours, _ = models
    text = "a tranquil lake with the mountains, 4k"
    contexts = []
    for encoder, tokenizer in zip(ours.text.encoders, ours.text.tokenizers):
        with torch.no_grad():
            out = encoder(tokenizer([text]))
        contexts.append(out.penultimate)
    context, pooled = ours.text.encode(text)
    assert torch.equal(context, torch.cat(contexts, dim=-1)) and torch.equal(pooled, out.text_embeds)
    # 76 tokens: two chunks where diffusers would cut the last token off.
    assert ours.text.encode("cat " * 76)[0].shape == (1, 154, 64)
    # Extra-network tags are not text.
    assert torch.equal(ours.text.encode("a boat <lora:detail:0.8>")[0], ours.text.encode("a boat")[0])


def test_sdxl_embeddings_use_each_encoders_vectors(models):
    _, _, base, refiner = models
    generator = torch.Generator().manual_seed(5)
    # Different widths per encoder would fail loudly if the keys were swapped.
    clip_l, clip_g = torch.randn(2, 32, generator=generator), torch.randn(2, 32, generator=generator) * 3
    embedding = Embedding("xlstyle", {"clip_l": clip_l, "clip_g": clip_g})
    context, _ = base.text.encode("a (xlstyle:1.2) boat", [embedding])
    for part, (encoder, tokenizer, key) in zip(context.split(32, dim=-1),
                                               zip(base.text.encoders, base.text.tokenizers, ("clip_l", "clip_g"))):
        alone = PromptEncoder(tokenizer, encoder, [Embedding("xlstyle", {"": embedding.vectors[key]})],
                              layer="penultimate")
        assert torch.equal(part, alone.encode("a (xlstyle:1.2) boat"))
    assert not torch.equal(context, base.text.encode("a (xlstyle:1.2) boat")[0])
    refined, _ = refiner.text.encode("a xlstyle boat", [embedding])
    alone = PromptEncoder(refiner.text.tokenizers[0], refiner.text.encoders[0],
                          [Embedding("xlstyle", {"": clip_g})], layer="penultimate")
    assert torch.equal(refined, alone.encode("a xlstyle boat"))


def test_generate_with_a_long_weighted_prompt(models):
    _, _, base, _ = models
    common = dict(negative_prompt="blurry", seed=3, steps=2, sampler="Euler", width=SIZE, height=SIZE)
    long = base.generate(prompt=LONG, **common)
    cut = base.generate(prompt="a red boat " + "cat " * 72, **common)
    assert long.images[0].size == (SIZE, SIZE)
    assert long.images[0].tobytes() != cut.images[0].tobytes()  # the later chunks reach the U-Net
    cond, uncond = base.prompt_conditioning(GenerationRequest(prompt=LONG, negative_prompt="blurry"), SIZE, SIZE)
    assert cond["context"].shape == uncond["context"].shape == (1, 231, 64)
