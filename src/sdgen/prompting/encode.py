"""Prompt text -> CLIP context of any length with per-token weights, as AUTOMATIC1111 1.10's
`FrozenCLIPEmbedderWithCustomWords` (modules/sd_hijack_clip.py) and its "Original" emphasis.

A prompt is split into pieces of equal weight (`parse_prompt_attention`), each piece tokenized on
its own, and the tokens packed into chunks of 75: `BREAK` starts a new chunk, and when a chunk
fills up less than `comma_padding_backtrack` tokens after a comma, the tokens after that comma move
to the next chunk. Each chunk is `[start] + 75 tokens + [end]`, padded with the end token (SD 2.x
puts its pad token, id 0, after the first end token), encoded on its own; then, per chunk,
`z *= weights` and `z *= mean(z_before) / mean(z_after)`. Chunks are concatenated along the
sequence axis: the context is (1, 77 * chunks, width).

Texts encoded together (`encode_batch`, the texts of a prompt schedule) share webui's batch
behaviour: all get as many chunks as the longest (empty chunks added) and the mean restore is
taken over the whole batch, duplicates counted, though each distinct text is encoded once.
One deliberate difference: when the comma backtrack moves an embedding to the next chunk, its
vectors move with it (webui leaves them at the old offset, over padding).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sdgen.models.clip import CLIPTextModel, TextEncoderOutput
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.prompting.embeddings import Embedding, EmbeddingLibrary
from sdgen.prompting.parse import BREAK, BREAK_WEIGHT, parse_prompt_attention

CHUNK_LENGTH = 75
EMBEDDING_PLACEHOLDER_ID = 0  # the id webui puts where an embedding's vectors go


@dataclass
class PromptChunk:
    """Token ids and weights of one chunk (without start/end until closed), and where embedding
    vectors replace placeholder tokens: (offset in the chunk without the start token, embedding)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


class PromptEncoder:
    """webui-compatible prompt encoding for one CLIP text encoder and its tokenizer.

    embeddings: textual inversions to recognise by name; embedding_key picks the vectors of SDXL
    embeddings ("clip_l" for the first encoder, "clip_g" for the second); normalize_mean=False is
    webui's "No norm" emphasis (weights applied, mean not restored); layer "penultimate" takes the
    raw second-to-last layer as SDXL does (clip_skip then has no effect), "hidden_states" the
    final-norm output of layer -clip_skip (SD 1.x / 2.x).
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 embeddings: EmbeddingLibrary | Sequence[Embedding] | None = None, *,
                 embedding_key: str | None = None, comma_padding_backtrack: int = 20,
                 normalize_mean: bool = True, layer: str = "hidden_states") -> None:
        if type(comma_padding_backtrack) is not int or not 0 <= comma_padding_backtrack <= CHUNK_LENGTH:
            raise ValueError(f"comma_padding_backtrack must be an integer in 0..{CHUNK_LENGTH}, got {comma_padding_backtrack!r}")
        if text_encoder.config.max_positions < CHUNK_LENGTH + 2:
            raise ValueError(f"the text encoder has {text_encoder.config.max_positions} positions; chunks need {CHUNK_LENGTH + 2}")
        if layer not in ("hidden_states", "penultimate"):
            raise ValueError(f"layer must be 'hidden_states' or 'penultimate', got {layer!r}")
        self.tokenizer, self.text_encoder, self.layer = tokenizer, text_encoder, layer
        self.embedding_key = embedding_key
        self.comma_padding_backtrack = comma_padding_backtrack
        self.normalize_mean = normalize_mean
        self.comma_id = tokenizer.vocab.get(",</w>")
        if isinstance(embeddings, EmbeddingLibrary):
            embeddings = list(embeddings.embeddings.values())
        # First token id of each embedding's name -> (name ids, embedding), longest names first.
        self._lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        for embedding in embeddings or []:
            ids = tokenizer.encode(embedding.name)
            if ids:
                entries = self._lookup.setdefault(ids[0], [])
                entries.append((ids, embedding))
                entries.sort(key=lambda entry: len(entry[0]), reverse=True)

    # Tokens -> chunks ------------------------------------------------------------------------------

    def _embedding_at(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        for ids, embedding in self._lookup.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return embedding, len(ids)
        return None

    def tokenize(self, text: str) -> tuple[list[PromptChunk], int]:
        """Closed chunks of 77 tokens and weights, and the prompt's token count (webui's "N/75")."""
        pieces = parse_prompt_attention(text)
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def close(is_last: bool = False) -> None:
            nonlocal chunk, token_count, last_comma
            token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
            padding = CHUNK_LENGTH - len(chunk.tokens)
            chunk.tokens = [self.tokenizer.start_id, *chunk.tokens, *[self.tokenizer.end_id] * padding, self.tokenizer.end_id]
            chunk.weights = [1.0, *chunk.weights, *[1.0] * padding, 1.0]
            chunks.append(chunk)
            chunk, last_comma = PromptChunk(), -1

        for piece, weight in pieces:
            if piece == BREAK and weight == BREAK_WEIGHT:
                close()
                continue
            tokens = self.tokenizer.encode(piece)
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_id:
                    last_comma = len(chunk.tokens)
                elif (self.comma_padding_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                      and len(chunk.tokens) - last_comma <= self.comma_padding_backtrack):
                    # Move the words after the last comma to the next chunk.
                    cut = last_comma + 1
                    moved = PromptChunk(chunk.tokens[cut:], chunk.weights[cut:],
                                        [(offset - cut, e) for offset, e in chunk.fixes if offset >= cut])
                    chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                    chunk.fixes = [(offset, e) for offset, e in chunk.fixes if offset < cut]
                    close()
                    chunk = moved
                if len(chunk.tokens) == CHUNK_LENGTH:
                    close()
                found = self._embedding_at(tokens, position)
                if found is None:
                    chunk.tokens.append(token)
                    chunk.weights.append(weight)
                    position += 1
                    continue
                embedding, name_length = found
                if len(chunk.tokens) + embedding.num_vectors > CHUNK_LENGTH:
                    close()
                chunk.fixes.append((len(chunk.tokens), embedding))
                chunk.tokens += [EMBEDDING_PLACEHOLDER_ID] * embedding.num_vectors
                chunk.weights += [weight] * embedding.num_vectors
                position += name_length
        if chunk.tokens or not chunks:
            close(is_last=True)
        return chunks, token_count

    def empty_chunk(self) -> PromptChunk:
        """The chunk of an empty prompt: start, then end tokens."""
        tokenizer = self.tokenizer
        return PromptChunk([tokenizer.start_id] + [tokenizer.end_id] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))

    # Chunks -> hidden states -----------------------------------------------------------------------

    def _encode_chunks(self, chunks: list[PromptChunk], clip_skip: int) -> TextEncoderOutput:
        """The text encoder's outputs for closed chunks (rows of 77), embedding vectors put in place."""
        device = self.text_encoder.text_model.embeddings.token_embedding.weight.device
        ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
        if self.tokenizer.pad_id != self.tokenizer.end_id:  # SD 2.x: pad ids after the first end token
            first_end = (ids == self.tokenizer.end_id).int().argmax(dim=1, keepdim=True)
            after = torch.arange(ids.shape[1], device=device) > first_end
            ids = ids.masked_fill(after, self.tokenizer.pad_id)
        fixes = [(row, offset, e.vectors_for(self.embedding_key)) for row, c in enumerate(chunks) for offset, e in c.fixes]
        if not fixes:
            return self.text_encoder(ids, clip_skip=clip_skip)
        # The embedding's vectors replace the placeholder tokens' (offset + 1: after the start token),
        # written into the token embeddings, whence gradients reach the vectors when they are trained.
        embeds = self.text_encoder.text_model.embeddings.token_embedding(ids)
        for row, offset, vectors in fixes:
            count = min(embeds.shape[1] - offset - 1, vectors.shape[0])
            embeds[row, offset + 1:offset + 1 + count] = vectors[:count].to(embeds.device, embeds.dtype)
        return self.text_encoder(ids, clip_skip=clip_skip, inputs_embeds=embeds)

    def _emphasis(self, z: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """webui's "Original" emphasis over a batch whose rows occur `counts` times."""
        if bool((weights == 1.0).all()):
            return z  # z * 1 and a mean ratio of exactly 1: skipping is bit-identical
        zf = z.float()
        total = counts.sum()
        original_mean = (zf.mean(dim=(1, 2)) * counts).sum() / total
        zf = zf * weights[:, :, None]
        if self.normalize_mean:
            new_mean = (zf.mean(dim=(1, 2)) * counts).sum() / total
            if new_mean != 0:  # all-zero weights: webui would divide by zero
                zf = zf * (original_mean / new_mean)
        return zf.to(z.dtype)

    def _encode(self, texts: Sequence[str], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contexts (len(texts), 77 * chunks, width) and pooled embeddings (len(texts), dim) of texts
        encoded together, under the caller's autograd mode. The pooled embedding is the first
        chunk's, before emphasis (webui's `zs[0].pooled`): projected `text_embeds` when the
        encoder has a projection."""
        if not texts:
            raise ValueError("no texts to encode")
        counts = Counter(texts)
        distinct = list(counts)
        tokenized = [self.tokenize(text)[0] for text in distinct]
        device = self.text_encoder.text_model.embeddings.token_embedding.weight.device
        count_tensor = torch.tensor([counts[t] for t in distinct], dtype=torch.float32, device=device)
        parts, pooled = [], None
        for i in range(max(len(chunks) for chunks in tokenized)):
            rows = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in tokenized]
            out = self._encode_chunks(rows, clip_skip)
            if pooled is None:
                pooled = out.text_embeds if out.text_embeds is not None else out.pooled
            weights = torch.tensor([r.weights for r in rows], dtype=torch.float32, device=device)
            parts.append(self._emphasis(getattr(out, self.layer), weights, count_tensor))
        contexts = torch.cat(parts, dim=1)
        if len(distinct) == len(texts):  # no repeats: the rows are already in the texts' order
            return contexts, pooled
        index = {text: row for row, text in enumerate(distinct)}
        rows = [index[text] for text in texts]
        return contexts[rows], pooled[rows]

    def encode_batch(self, texts: Sequence[str], clip_skip: int = 1) -> torch.Tensor:
        """Contexts (len(texts), 77 * chunks, width) of texts encoded together, as webui encodes
        the texts of one prompt schedule (same chunk count, shared mean restore)."""
        with torch.inference_mode():
            return self._encode(texts, clip_skip)[0]

    def encode_differentiable(self, texts: Sequence[str], clip_skip: int = 1) -> torch.Tensor:
        """`encode_batch` under the caller's autograd mode, for fine-tuning (as webui's trainers call its
        embedder): gradients reach the text encoder's weights and the embeddings' vectors; wrap the
        call in `torch.no_grad()` when the encoder is frozen."""
        return self._encode(texts, clip_skip)[0]

    def encode_with_pooled(self, texts: Sequence[str], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_batch`'s contexts and each text's pooled embedding (first chunk, no emphasis), as
        webui's SDXL embedders return them (`torch.hstack(zs), zs[0].pooled`)."""
        with torch.inference_mode():
            return self._encode(texts, clip_skip)

    def encode(self, text: str, clip_skip: int = 1) -> torch.Tensor:
        """Context (1, 77 * chunks, width) of one prompt (emphasis, BREAK, embeddings applied)."""
        return self.encode_batch([text], clip_skip)

    def encode_pooled(self, text: str, clip_skip: int = 1) -> torch.Tensor:
        """The pooled embedding of the prompt's first chunk (projected `text_embeds` when the encoder
        has a projection), as webui passes SDXL's U-Net; emphasis does not touch it."""
        with torch.inference_mode():
            out = self._encode_chunks(self.tokenize(text)[0][:1], clip_skip)
        return out.text_embeds if out.text_embeds is not None else out.pooled

    def encode_schedule(self, schedule: Sequence[tuple[int, str]], clip_skip: int = 1) -> list[tuple[int, torch.Tensor]]:
        """[(until_step, context (1, L, width))] for a `prompt_schedule`; pick per step with `prompt_at_step`."""
        contexts = self.encode_batch([text for _, text in schedule], clip_skip)
        return [(until, contexts[i:i + 1]) for i, (until, _) in enumerate(schedule)]

    def encode_pair(self, positive: str, negative: str, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Contexts of a prompt and a negative prompt with the same number of chunks: the shorter
        gets the empty prompt's chunk appended (webui's "pad prompt/negative prompt" option)."""
        cond, uncond = self.encode(positive, clip_skip), self.encode(negative, clip_skip)
        return pad_to_same_length(cond, uncond, self.encode("", clip_skip))


def pad_to_same_length(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append copies of the empty prompt's context (1, 77, width) to the shorter of two contexts."""
    missing = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if missing > 0:
        uncond = torch.cat([uncond, empty.expand(uncond.shape[0], -1, -1).repeat(1, missing, 1)], dim=1)
    elif missing < 0:
        cond = torch.cat([cond, empty.expand(cond.shape[0], -1, -1).repeat(1, -missing, 1)], dim=1)
    return cond, uncond
