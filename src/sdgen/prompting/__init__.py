"""AUTOMATIC1111's prompt language: emphasis, BREAK, prompt editing and alternation, extra-network
tags, long-prompt encoding with per-token weights, and textual-inversion embeddings."""

from sdgen.prompting.embeddings import Embedding, EmbeddingError, EmbeddingLibrary
from sdgen.prompting.encode import PromptEncoder, pad_to_same_length
from sdgen.prompting.parse import (
    LoraReference,
    extract_extra_networks,
    extract_loras,
    parse_lora_argument,
    parse_prompt_attention,
    split_composable,
)
from sdgen.prompting.schedule import prompt_at_step, prompt_schedule

__all__ = [
    "Embedding",
    "EmbeddingError",
    "EmbeddingLibrary",
    "PromptEncoder",
    "pad_to_same_length",
    "LoraReference",
    "extract_extra_networks",
    "extract_loras",
    "parse_lora_argument",
    "parse_prompt_attention",
    "prompt_at_step",
    "prompt_schedule",
    "split_composable",
]
