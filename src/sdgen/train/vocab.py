"""A small CLIP-format BPE vocabulary learnt from a word list, so every known word is one token.

The result uses the CLIP tokenizer's file format (byte tokens, the same bytes with `</w>`,
one token per merge, then the start and end tokens), so the ordinary CLIP tokenizer code,
ours or the reference's, reads it; unknown words still tokenize, as bytes.
"""

from __future__ import annotations

from collections import Counter

from sdgen.models.tokenizer import byte_alphabet


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE (Sennrich et al. 2016) until every word is a single token; ties break by order."""
    table = byte_alphabet()
    pieces: dict[str, list[str]] = {}
    for word in sorted(set(words)):
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        pieces[word] = symbols
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in pieces.values():
            for pair in zip(symbols, symbols[1:]):
                counts[pair] += 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for word, symbols in pieces.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            pieces[word] = out


def build_vocabulary(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's layout for the given words (lower case, as the tokenizer sees them)."""
    merges = learn_merges([w.lower() for w in words])
    byte_tokens = list(byte_alphabet().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges
