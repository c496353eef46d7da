"""PromptEncoder: webui's long-prompt chunking, per-token weights and mean restore, checked against
transformers' CLIPTextModel (tiny random weights, the real CLIP vocabulary) fed the ids and
weights computed by hand here.

Tolerance: 1e-5 * max(1, max|reference|). Our CLIP differs from transformers' by ~1e-7 in fp32
(test_clip.py); an unweighted prompt of <= 75 tokens equals our plain text encoder bit for bit.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import reference_clip as ref
from sdgen.models.clip_config import CLIPTextConfig
from sdgen.models.clip import CLIPTextModel
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.prompting import prompt_at_step, prompt_schedule
from sdgen.prompting.embeddings import Embedding
from sdgen.prompting.encode import PromptEncoder, pad_to_same_length

TOLERANCE = 1e-5
VOCAB = 49408
START, END = 49406, 49407


@functools.lru_cache(maxsize=2)
def tiny_text_models(projection: bool = False) -> tuple[torch.nn.Module, CLIPTextModel]:
    """A transformers CLIPTextModel with the CLIP vocabulary and 32 channels, and ours with its weights."""
    config = ref.text_config(vocab_size=VOCAB, eos_token_id=END, hidden_act="gelu" if projection else "quick_gelu")
    reference = ref.text_model(config, projection=projection, seed=3)
    ours = CLIPTextModel(CLIPTextConfig.from_transformers(ref.config_json(reference))).eval()
    ours.load_state_dict(ref.published_state_dict(reference), strict=True)
    return reference, ours


@functools.lru_cache(maxsize=2)
def tokenizer(pad: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer.default(pad_token=pad)


def encoder(**options) -> PromptEncoder:
    return PromptEncoder(tokenizer(), tiny_text_models()[1], **options)


def reference_hidden(ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return tiny_text_models()[0](torch.tensor(ids)).last_hidden_state


def chunk_ids(tokens: list[int], pad: int = END) -> list[int]:
    """[start] + tokens + end padding to 76, + end; SD 2.x pads after the first end token."""
    ids = [START, *tokens, END]
    return ids + [pad] * (77 - len(ids))


def assert_close(ours: torch.Tensor, expected: torch.Tensor) -> float:
    assert ours.shape == expected.shape
    diff = (ours - expected).abs().max().item()
    print(f"max abs diff {diff:.2e}")
    assert diff <= TOLERANCE * max(1.0, expected.abs().max().item())
    return diff


def test_plain_prompt_equals_the_text_encoder_bit_for_bit():
    text = "a photograph of an astronaut riding a horse, 4k"
    ids = tokenizer()([text])
    with torch.no_grad():
        plain = tiny_text_models()[1](ids).hidden_states
    assert torch.equal(encoder().encode(text), plain)
    for clip_skip in (2, 3):
        with torch.no_grad():
            skipped = tiny_text_models()[1](ids, clip_skip=clip_skip).hidden_states
        assert torch.equal(encoder().encode(text, clip_skip=clip_skip), skipped)


def test_weighted_prompt_matches_hand_computed_emphasis():
    tok = tokenizer()
    # "a (red:1.5) circle" -> pieces "a ", "red", " circle", each tokenized on its own.
    pieces = [(tok.encode("a "), 1.0), (tok.encode("red"), 1.5), (tok.encode(" circle"), 1.0)]
    tokens = [t for ids, _ in pieces for t in ids]
    weights = [1.0] + [w for ids, w in pieces for _ in ids]
    weights += [1.0] * (77 - len(weights))
    z = reference_hidden([chunk_ids(tokens)])
    weighted = z * torch.tensor(weights)[None, :, None]
    expected = weighted * (z.mean() / weighted.mean())
    assert_close(encoder().encode("a (red:1.5) circle"), expected)
    # "No norm" emphasis leaves the mean alone.
    assert_close(encoder(normalize_mean=False).encode("a (red:1.5) circle"), weighted)


def test_long_prompt_is_encoded_in_chunks_of_75():
    cat = tokenizer().encode("cat")
    assert len(cat) == 1
    context = encoder().encode("cat " * 100)
    assert context.shape == (1, 154, 32)
    expected = reference_hidden([chunk_ids(cat * 75), chunk_ids(cat * 25)])
    assert_close(context, torch.cat([expected[0], expected[1]])[None])
    chunks, count = encoder().tokenize("cat " * 100)
    assert count == 100 and len(chunks) == 2


def test_comma_padding_backtrack_moves_the_words_after_the_last_comma():
    tok = tokenizer()
    cat, dog, comma = tok.encode("cat"), tok.encode("dog"), tok.encode(",")
    text = "cat " * 70 + ", " + "dog " * 10
    expected = reference_hidden([chunk_ids(cat * 70 + comma), chunk_ids(dog * 10)])
    assert_close(encoder().encode(text), torch.cat([expected[0], expected[1]])[None])
    # With the backtrack off, the chunk boundary falls after 75 tokens.
    plain = reference_hidden([chunk_ids(cat * 70 + comma + dog * 4), chunk_ids(dog * 6)])
    assert_close(encoder(comma_padding_backtrack=0).encode(text), torch.cat([plain[0], plain[1]])[None])


def test_break_starts_a_new_chunk():
    tok = tokenizer()
    expected = reference_hidden([chunk_ids(tok.encode("cat")), chunk_ids(tok.encode("dog"))])
    assert_close(encoder().encode("cat BREAK dog"), torch.cat([expected[0], expected[1]])[None])
    # A trailing BREAK adds nothing; a leading one adds an empty chunk (as webui).
    assert encoder().encode("cat BREAK").shape[1] == 77
    assert encoder().encode("BREAK cat").shape[1] == 154


def test_sd2_chunks_pad_with_the_pad_token_after_the_end_token():
    sd2_tokenizer = tokenizer("!")
    sd2 = PromptEncoder(sd2_tokenizer, tiny_text_models()[1])
    text = "a red circle"
    ids = chunk_ids(sd2_tokenizer.encode(text), pad=0)
    assert ids == sd2_tokenizer([text])[0].tolist()
    assert_close(sd2.encode(text), reference_hidden([ids]))
    with torch.no_grad():
        plain = tiny_text_models()[1](sd2_tokenizer([text])).hidden_states
    assert torch.equal(sd2.encode(text), plain)


def test_encode_pair_pads_the_shorter_with_empty_prompt_chunks():
    cond, uncond = encoder().encode_pair("cat " * 100, "blurry")
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert torch.equal(uncond[:, :77], encoder().encode("blurry"))
    assert torch.equal(uncond[:, 77:], encoder().encode(""))
    cond, uncond = encoder().encode_pair("cat", "dog " * 80)
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert torch.equal(cond[:, 77:], encoder().encode(""))
    a, b = pad_to_same_length(cond, uncond, encoder().encode(""))
    assert a is cond and b is uncond


def test_schedule_encodes_each_text_and_picks_per_step():
    schedule = prompt_schedule("a [cat:dog:2] on a mat", 4)
    assert schedule == [(2, "a cat on a mat"), (4, "a dog on a mat")]
    conds = encoder().encode_schedule(schedule)
    assert torch.equal(prompt_at_step(conds, 0), encoder().encode("a cat on a mat"))
    assert torch.equal(prompt_at_step(conds, 2), encoder().encode("a cat on a mat"))
    assert torch.equal(prompt_at_step(conds, 3), encoder().encode("a dog on a mat"))


def test_batch_shares_chunk_count_and_mean_restore_as_webui():
    texts = ["(cat:1.3) on a mat", "dog " * 80, "(cat:1.3) on a mat"]
    batch = encoder().encode_batch(texts)
    assert batch.shape == (3, 154, 32)
    tok = tokenizer()
    cat, rest, dog = tok.encode("cat"), tok.encode(" on a mat"), tok.encode("dog")
    w = [1.0] + [1.3] * len(cat) + [1.0] * (76 - len(cat))
    # webui encodes chunk i of every text of the batch together and restores the batch mean.
    first = reference_hidden([chunk_ids(cat + rest), chunk_ids(dog * 75), chunk_ids(cat + rest)])
    weights = torch.tensor([w, [1.0] * 77, w])[:, :, None]
    expected_first = first * weights * (first.mean() / (first * weights).mean())
    second = reference_hidden([[START] + [END] * 76, chunk_ids(dog * 5), [START] + [END] * 76])
    assert_close(batch[:, :77], expected_first)
    assert_close(batch[:, 77:], second)


def test_sdxl_layer_and_pooled_embedding():
    reference, model = tiny_text_models(projection=True)
    sdxl = PromptEncoder(tokenizer("!"), model, layer="penultimate")
    text = "a red circle"
    ids = tokenizer("!")([text])
    with torch.no_grad():
        out = model(ids)
        expected = reference(ids, output_hidden_states=True)
    assert torch.equal(sdxl.encode(text), out.penultimate)
    assert_close(sdxl.encode(text), expected.hidden_states[-2])
    assert_close(sdxl.encode_pooled(text), expected.text_embeds)
    # Weights change the context, not the pooled embedding.
    assert torch.equal(sdxl.encode_pooled("a (red:1.4) circle"), sdxl.encode_pooled(text))
    assert sdxl.encode("a (red:1.4) circle").shape == (1, 77, 32)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="layer"):
        encoder(layer="last")
    with pytest.raises(ValueError, match="comma_padding_backtrack"):
        encoder(comma_padding_backtrack=-1)
    with pytest.raises(ValueError, match="no texts"):
        encoder().encode_batch([])


def test_differentiable_encoding_equals_inference_and_carries_gradients():
    model = copy.deepcopy(tiny_text_models()[1]).requires_grad_(True)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    trainable = PromptEncoder(tokenizer(), model, [Embedding("zorpish", {"": vectors})])
    texts = ["a (zorpish:1.2) on a [mat]", "cat " * 80 + "BREAK zorpish", "a (zorpish:1.2) on a [mat]"]
    contexts = trainable.encode_differentiable(texts)
    assert contexts.requires_grad and contexts.shape == (3, 231, 32)
    assert torch.equal(contexts.detach(), trainable.encode_batch(texts))  # the layout and weights prompts get
    (contexts[1, 154:].sum() + contexts[0].pow(2).sum()).backward()
    assert vectors.grad.abs().sum() > 0  # through the embedding's placeholder positions
    for name in ("text_model.final_layer_norm.weight", "text_model.encoder.layers.0.mlp.fc1.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    with torch.no_grad():
        assert not trainable.encode_differentiable(texts[:1]).requires_grad
