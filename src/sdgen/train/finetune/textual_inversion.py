"""Textual inversion (Gal et al. 2022): new token vectors learnt with the whole model frozen, saved
in AUTOMATIC1111's embedding formats.

The prompt layout is the one `sdgen.prompting.PromptEncoder` gives at generation time (the
embedding's name replaced by its vectors), so what is trained is exactly what a prompt gets.
Files: `.pt` as webui's trainer writes it (`string_to_token`, `string_to_param` {"*": (n, width)},
`name`, `step`, `sd_checkpoint`, `sd_checkpoint_name`), or `.safetensors` with `emb_params`.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from sdgen.models.clip import CLIPTextModel
from sdgen.models.tokenizer import CLIPTokenizer
from sdgen.prompting.embeddings import Embedding
from sdgen.prompting.encode import PromptEncoder
from sdgen.runtime.files import write_bytes_atomically
from sdgen.train.finetune.lora_network import Shared

WEBUI_STAR_TOKEN = 265  # the id of "*" in CLIP's vocabulary, which webui's files record


class TextualInversion(nn.Module):
    """`num_vectors` trainable vectors for the prompt word `name`, started from `init_text`'s token
    embeddings (cycled to fill them), as webui's "Initialization text"."""

    def __init__(self, name: str, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 num_vectors: int = 1, init_text: str = "*") -> None:
        super().__init__()
        if not tokenizer.encode(name) or any(c in name for c in ",()[]:<>"):
            raise ValueError(f"embedding name {name!r} must be a plain word (no commas, brackets or colons)")
        if not 1 <= num_vectors <= 75:
            raise ValueError(f"num_vectors must be between 1 and 75, got {num_vectors}")
        ids = tokenizer.encode(init_text) or [tokenizer.end_id]
        table = text_encoder.text_model.embeddings.token_embedding.weight.detach()
        init = table[[ids[i % len(ids)] for i in range(num_vectors)]].float().clone()
        self.name = name
        self.vectors = nn.Parameter(init)
        self._frozen = Shared((tokenizer, text_encoder))  # not in the checkpoint, not copied for the EMA

    def prompt(self, caption: str) -> str:
        """The caption with `[name]` filled in; the name is put first when the caption lacks it."""
        if "[name]" in caption:
            return caption.replace("[name]", self.name)
        if self.name not in caption:
            return f"{self.name}, {caption}" if caption else self.name
        return caption

    def encode(self, captions: list[str], clip_skip: int = 1) -> torch.Tensor:
        """Contexts (batch, 77 * chunks, width) exactly as the prompts get them (emphasis, chunks, the
        batch's shared mean restore), differentiable in the vectors."""
        encoder = PromptEncoder(*self._frozen.value, [Embedding(self.name, {"": self.vectors})])
        return encoder.encode_differentiable([self.prompt(c) for c in captions], clip_skip)

    def embedding(self) -> Embedding:
        return Embedding(self.name, {"": self.vectors.detach().clone()})

    def save(self, path: str | Path, step: int = 0, model_hash: str | None = None,
             model_name: str | None = None) -> Path:
        """Write the embedding as `.pt` (webui's trainer format) or `.safetensors` (`emb_params`)."""
        path = Path(path)
        vectors = self.vectors.detach().float().clone().contiguous()
        if path.suffix == ".safetensors":
            return write_bytes_atomically(path, save({"emb_params": vectors}, metadata={"name": self.name}))
        if path.suffix != ".pt":
            raise ValueError(f"{path}: an embedding is saved as .pt or .safetensors")
        buffer = io.BytesIO()
        torch.save({"string_to_token": {"*": WEBUI_STAR_TOKEN}, "string_to_param": {"*": vectors},
                    "name": self.name, "step": step, "sd_checkpoint": model_hash,
                    "sd_checkpoint_name": model_name}, buffer)
        return write_bytes_atomically(path, buffer.getvalue())
