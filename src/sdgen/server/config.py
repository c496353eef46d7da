"""Server settings (from `sdgen serve` flags) and the objects every route shares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sdgen.pipelines.request import Limits

DEFAULT_PORT = 7860
MODEL_PREVIEW_DECODER = "model"  # `--preview-decoder model`: each model folder's own tiny_decoder.safetensors


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/sdgen`, i.e. `~/.local/share/sdgen` by default."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "sdgen"


@dataclass(frozen=True)
class ServerConfig:
    """What `sdgen serve` was told; limits apply to every request before anything is queued."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    model: str | None = None  # None: the embedded model
    models_dir: str | None = None
    api_auth: str | None = None  # "user:password[,user2:password2]" as A1111's --api-auth
    insecure: bool = False
    allowed_hosts: tuple[str, ...] = ()
    limits: Limits = Limits(max_side=2048, max_pixels=1024 * 1024, max_steps=150, max_images=16,
                            max_batch_size=8, max_prompt_chars=20_000)
    max_queue: int = 32
    max_body_bytes: int = 32 * 1024 * 1024
    preview_every: int = 3
    # a tiny (TAESD) decoder for previews, or MODEL_PREVIEW_DECODER: each model folder's own (the
    # embedded model ships one); None: the linear "Approx cheap" map
    preview_decoder: Path | str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    fast: bool = False  # the CPU fast paths of sdgen.runtime.fast (rounding changes only)

    @property
    def listens_publicly(self) -> bool:
        return self.host not in ("127.0.0.1", "localhost", "::1")

    def credentials(self) -> dict[str, str]:
        """user -> password from `api_auth`; ValueError for an entry without a colon."""
        table: dict[str, str] = {}
        for entry in filter(None, (self.api_auth or "").split(",")):
            user, sep, password = entry.strip().partition(":")
            if not sep or not user or not password:
                raise ValueError("--api-auth takes user:password pairs separated by commas")
            table[user] = password
        return table
