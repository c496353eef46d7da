"""Coverage-guided fuzzing of the loaders with atheris (libFuzzer for Python); not part of CI.

    .venv/bin/pip install -e '.[fuzz]'                 # atheris (binary wheels for CPython 3.11)
    .venv/bin/python tests/fuzz/atheris_targets.py safetensors tests/fuzz/corpus/safetensors -max_total_time=600
    .venv/bin/python tests/fuzz/atheris_targets.py ckpt tests/fuzz/corpus/ckpt -max_total_time=600
    .venv/bin/python tests/fuzz/atheris_targets.py png tests/fuzz/corpus/png -max_total_time=600

The first argument picks the target; the rest go to libFuzzer (a corpus folder to start from and
grow, `-max_total_time`, `-runs`, `-max_len`...). A crash is a loader raising anything but a
UserError with a one-line message (see fuzz_oracle.py); libFuzzer writes the input to
`crash-<hash>`. Add such files to make_corpus.py's seeds (or the corpus) so CI replays them.
Pass a scratch copy of the corpus folder if the committed one should stay as it is.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
with atheris.instrument_imports(include=["sdgen"]):
    from fuzz_oracle import LOADERS, check_file

TARGETS = {
    "safetensors": ["load_state_dict", "read_checkpoint", "read_vae", "read_lora", "read_embedding",
                    "load_tiny_decoder"],
    "ckpt": ["load_state_dict", "read_checkpoint", "read_vae", "read_lora", "read_embedding",
             "load_tiny_decoder"],
    "png": ["read_image", "read_infotext"],
    "all": list(LOADERS),
}
SUFFIX = {"safetensors": ".safetensors", "ckpt": ".ckpt", "png": ".png", "all": ".bin"}


def make_target(name: str):
    """The libFuzzer callback for one target: the input bytes as a file, every chosen loader on it."""
    loaders = {loader: LOADERS[loader] for loader in TARGETS[name]}
    folder = Path(tempfile.mkdtemp(prefix="sdgen-fuzz-"))
    path = folder / f"input{SUFFIX[name]}"

    def one_input(data: bytes) -> None:
        path.write_bytes(data)
        check_file(path, loaders)

    return one_input


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: atheris_targets.py {{{','.join(TARGETS)}}} [corpus folder] [libFuzzer options]")
    name = sys.argv.pop(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    atheris.Setup(sys.argv, make_target(name))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
