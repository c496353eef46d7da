"""What every loader may do with an arbitrary file: return, or raise a UserError (one line). Nothing else.

Shared by the corpus replay (`test_fuzz_replay.py`, in CI) and the atheris targets
(`atheris_targets.py`, longer runs by hand). The loaders are the public entry points a user's
file reaches: model checkpoints, VAEs, LoRAs, textual-inversion embeddings, tiny preview decoders,
images and their
infotext. Formats are sniffed from content, so every loader gets every file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdgen.checkpoints import load_state_dict, read_checkpoint, read_vae
from sdgen.errors import UserError
from sdgen.lora import read_lora
from sdgen.models.tiny_decoder import load_tiny_decoder
from sdgen.pipelines.image_files import read_infotext
from sdgen.pipelines.images import read_image
from sdgen.prompting.embeddings import read_embedding

ALLOWED = (UserError,)  # CheckpointError, LoraError, EmbeddingError, RequestError... all derive from it


def _image(path: Path) -> None:
    with read_image(path):
        pass


LOADERS: dict[str, Callable[[Path], object]] = {
    "load_state_dict": load_state_dict,
    "read_checkpoint": read_checkpoint,
    "read_vae": read_vae,
    "read_lora": read_lora,
    "read_embedding": read_embedding,
    "load_tiny_decoder": load_tiny_decoder,
    "read_image": _image,
    "read_infotext": read_infotext,
}


class UnexpectedFailure(AssertionError):
    """A loader raised something other than a UserError, or a message that is not one line."""


def check_file(path: Path, loaders: dict[str, Callable[[Path], object]] = LOADERS) -> dict[str, str]:
    """Run every loader on `path`; the outcome of each ("ok" or the error's class), or UnexpectedFailure."""
    outcomes = {}
    for name, loader in loaders.items():
        try:
            loader(path)
            outcomes[name] = "ok"
        except ALLOWED as error:
            message = str(error)
            if "\n" in message or not message:
                raise UnexpectedFailure(f"{name}({path.name}): message is not one line: {message!r}") from error
            outcomes[name] = type(error).__name__
        except Exception as error:  # the finding: a traceback a user would see
            raise UnexpectedFailure(f"{name}({path.name}) raised {type(error).__name__}: {error}") from error
    return outcomes
