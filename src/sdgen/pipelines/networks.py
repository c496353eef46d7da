"""LoRAs named in a prompt (AUTOMATIC1111's `<lora:name:weight>`), merged for one run, and their infotext hashes.

As in A1111, the tags stay in the prompt that the infotext records (so a replay applies the
same LoRAs) and are removed from the text that is encoded; only the positive prompt's tags
count. LoRA files are looked up by name in the pipeline's `lora_dir` (`--lora-dir`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sdgen.lora import LoraError, apply_loras, find_lora, read_lora
from sdgen.prompting.parse import LoraReference, extract_loras


def _warn(message: str) -> None:
    print(f"sdgen: warning: {message}", file=sys.stderr)


def prompt_loras(prompt: str) -> list[LoraReference]:
    """The `<lora:...>` references of a prompt (other extra-network kinds are reported and ignored)."""
    return extract_loras(prompt, _warn)[1]


def _files(pipe, references: list[LoraReference]):
    folder = getattr(pipe, "lora_dir", None)
    if folder is None:
        names = ", ".join(list(dict.fromkeys(reference.name for reference in references))[:5])
        raise LoraError(f"the prompt asks for LoRA {names} but no LoRA folder is set; pass --lora-dir FOLDER")
    return [(read_lora(find_lora(folder, ref.name), ref.name), (ref.te_weight, ref.unet_weight)) for ref in references]


@contextmanager
def loras_applied(pipe, prompt: str) -> Iterator[None]:
    """Merge the prompt's LoRAs into the U-Net and text encoder for the block, bit-exactly undone after."""
    references = prompt_loras(prompt)
    if not references:
        yield
        return
    with apply_loras(pipe.unet, getattr(pipe, "text_encoder", None), _files(pipe, references)):
        yield


def lora_hashes(pipe, prompt: str) -> str | None:
    """A1111's "Lora hashes" value: `name: first 12 hex of the file's sha256`, comma separated."""
    references = prompt_loras(prompt)
    if not references:
        return None
    return ", ".join(f"{lora.name}: {lora.shorthash}" for lora, _ in _files(pipe, references))
