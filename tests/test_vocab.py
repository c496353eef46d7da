"""The small scene vocabulary: every word is one token for the reference CLIP tokenizer too."""

import json

from sdgen.train.vocab import build_vocabulary

WORDS = ["a", "red", "green", "blue", "circle", "circles", "square", "star", "stars", "mountains",
         "tranquil", "lake", "with", "the", "at", "sunset", "futuristic", "cityscape", "left", "of"]


def test_every_word_is_a_single_token_for_transformers(tmp_path):
    from transformers import CLIPTokenizer

    vocab, merges = build_vocabulary(WORDS)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    reference = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for word in WORDS:
        ids = reference(word, add_special_tokens=False)["input_ids"]
        assert ids == [vocab[word + "</w>"]], word
    assert reference("a red circle")["input_ids"] == [
        vocab["<|startoftext|>"], vocab["a</w>"], vocab["red</w>"], vocab["circle</w>"], vocab["<|endoftext|>"]]
    # an unknown word still tokenizes, as pieces
    assert len(reference("zebra", add_special_tokens=False)["input_ids"]) >= 1
