"""A batch file: JSON lines, each a full generation request, and the key that names its outcome.

A line holds `GenerationRequest` fields (`prompt`, `negative_prompt`, `seed`, `steps`, `sampler`,
`scheduler`, `cfg_scale`, `width`, `height`, `n`, ...; `negative`, `cfg` and `sampler_name` are
accepted for the usual names) plus `model` and `vae` (paths; none means the embedded model).
The key is a hash of the request with its defaults filled in, so two lines asking for the same
images share one key and a rerun recognises requests already done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sdgen.errors import UserError
from sdgen.pipelines.request import GenerationRequest, RequestError

ALIASES = {"negative": "negative_prompt", "cfg": "cfg_scale", "sampler_name": "sampler"}
MODEL_FIELDS = ("model", "vae")
REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)}


@dataclass(frozen=True)
class BatchEntry:
    """One line of a batch file: its key, the request (None when the line is unusable) or the error."""

    line: int
    key: str
    request: GenerationRequest | None
    model: str | None = None
    vae: str | None = None
    error: str | None = None

    def to_row(self) -> dict:
        """A plain dict (JSON types only) that travels to Ray workers."""
        return {"line": self.line, "key": self.key, "model": self.model, "vae": self.vae, "error": self.error,
                "request": json.dumps(asdict(self.request)) if self.request else None}

    @classmethod
    def from_row(cls, row: dict) -> "BatchEntry":
        request = GenerationRequest(**json.loads(row["request"])) if row.get("request") else None
        return cls(int(row["line"]), str(row["key"]), request, row.get("model"), row.get("vae"), row.get("error"))


def request_key(fields_: dict) -> str:
    """16 hex digits of the sha256 of the canonical JSON of a request's fields."""
    canonical = json.dumps(fields_, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_line(text: str, line: int) -> BatchEntry:
    """One JSON line -> BatchEntry; a bad line gives an entry with `error` set, never an exception."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        return BatchEntry(line, request_key({"unparsed": text}), None, error=f"line {line}: not JSON ({error.msg})")
    if not isinstance(raw, dict):
        return BatchEntry(line, request_key({"unparsed": text}), None, error=f"line {line}: expected a JSON object")
    values = {ALIASES.get(name, name): value for name, value in raw.items()}
    unknown = sorted(set(values) - REQUEST_FIELDS - set(MODEL_FIELDS))
    model = {name: values.pop(name, None) for name in MODEL_FIELDS}
    try:
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(REQUEST_FIELDS))}, model, vae")
        for name, value in model.items():
            if value is not None and not isinstance(value, str):
                raise RequestError(f"{name} must be a path, got {value!r}")
        request = GenerationRequest(**values)
        request.validate()
    except (RequestError, TypeError) as error:
        return BatchEntry(line, request_key({"unparsed": text}), None, error=f"line {line}: {error}")
    key = request_key({**asdict(request), **model})
    return BatchEntry(line, key, request, model["model"], model["vae"])


def read_batch(path: str | Path) -> list[BatchEntry]:
    """Every non-blank line of a batch file, in order, duplicates (same key) kept once."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such batch file; give a JSON-lines file of requests")
    entries, seen = [], set()
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if text.strip():
            entry = parse_line(text, number)
            if entry.key not in seen:
                seen.add(entry.key)
                entries.append(entry)
    return entries
