"""`GET /sdapi/v1/progress` answered below FastAPI's routing, because clients poll it many times a second.

A1111's web UI and scripts poll progress while an image is made, on the same CPU cores that make
it, and every bit of CPU a poll takes is taken from the generation (while one of its two OpenMP
threads is preempted, the other waits at the next barrier). Two layers keep polls cheap:

- `ProgressShortcut`, an ASGI wrapper: routing, parameter validation and response encoding in
  FastAPI cost about 0.15 ms of the 0.33 ms a poll took on an idle server; it builds the same
  response model and sends its JSON directly.
- `polling_protocol`, uvicorn's h11 protocol answering a plain keep-alive poll as soon as its bytes
  arrive: no h11 events, no ASGI task, one write. Polled at 50 Hz, a 64x64 generation on two
  cores slows by about 7% through the ASGI path, 3.4 to 4.3% this way (`bench/RESULTS.md`).

Both answer only what they fully recognise and pass everything else on: another method or path,
an unexpected `skip_current_image` value, a request the Guard would refuse, anything unusual in
the bytes. FastAPI's route keeps the schema in `/docs` and answers malformed queries with its 422.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sdgen.server.a1111 import progress_response
from sdgen.server.security import Guard

if TYPE_CHECKING:
    from sdgen.server.app import Server

PATH = "/sdapi/v1/progress"
# pydantic's lax booleans, as FastAPI reads a query parameter
FLAGS = {"1": True, "true": True, "t": True, "on": True, "yes": True, "y": True,
         "0": False, "false": False, "f": False, "off": False, "no": False, "n": False}
HEADERS = [(b"content-type", b"application/json")]

# One whole keep-alive poll and nothing else: the request line, then header lines made of an HTTP
# token, a colon and printable ASCII. Anything else (a body, obs-fold, non-ASCII, pipelining, a
# request split over two reads) does not match and goes through h11 as usual.
POLL_START = f"GET {PATH}".encode()
POLL_REQUEST = re.compile(re.escape(POLL_START) + rb"(?:\?([!-~]*))? HTTP/1\.1\r\n"
                          rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ -~\t]*\r\n)*)\r\n")
HEADER_LINE = re.compile(rb"([^:]+):[ \t]*([ -~\t]*?)[ \t]*\r\n")
# headers that change framing or the connection: their requests take h11's way
FRAMING_HEADERS = {"content-length", "transfer-encoding", "upgrade", "expect", "te", "trailer"}
MAX_POLL_BYTES = 8192


def parse_poll(data: bytes) -> tuple[bytes, dict[str, str]] | None:
    """(query string, lower-cased headers) when `data` is exactly one plain progress poll that
    keeps its connection open; None for anything else."""
    if len(data) > MAX_POLL_BYTES:
        return None
    match = POLL_REQUEST.fullmatch(data)
    if match is None:
        return None
    headers = {}
    for name, value in HEADER_LINE.findall(match[2]):
        key = name.decode("ascii").lower()
        if key in headers or key in FRAMING_HEADERS:
            return None
        headers[key] = value.decode("ascii")
    if "host" not in headers or headers.get("connection", "keep-alive").lower() != "keep-alive":
        return None
    return match[1] or b"", headers


def _skip_current_image(query: bytes) -> bool | None:
    """The query's `skip_current_image` flag (False when absent), or None when FastAPI should judge it."""
    try:
        values = [value for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
                  if key == "skip_current_image"]
    except ValueError:
        return None
    if not values:
        return False
    return FLAGS.get(values[-1].lower())


def progress_body(server: Server, skip_current_image: bool) -> bytes:
    """The JSON of A1111's progress answer, as the FastAPI route would encode it."""
    return progress_response(server, skip_current_image).model_dump_json().encode()


class ProgressShortcut:
    """Wraps the FastAPI app; answers well-formed progress polls itself, passes everything else on."""

    def __init__(self, app: ASGIApp, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == PATH:
            skip = _skip_current_image(scope.get("query_string", b""))
            if skip is not None:
                body = progress_body(self.server, skip)
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*HEADERS, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def polling_protocol(guard: Guard, server: Server) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, answering plain progress polls that `guard` lets through
    itself; pass it to uvicorn as `http=`.

    It reads uvicorn's per-connection state (`cycle`, `conn`, `flow`, the keep-alive timer) as
    uvicorn's own methods do; `tests/test_server_polling_protocol.py` holds it to uvicorn's answers.
    """

    class PollingProtocol(H11Protocol):
        def data_received(self, data: bytes) -> None:
            if not self._answered_poll(data):
                super().data_received(data)

        def _idle(self) -> bool:
            """No request in flight, none half-read by h11, the client reading what we write."""
            return ((self.cycle is None or self.cycle.response_complete) and self.conn.our_state is h11.IDLE
                    and self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]
                    and not self.flow.write_paused and not self.transport.is_closing())

        def _answered_poll(self, data: bytes) -> bool:
            if not data.startswith(POLL_START) or not self._idle():
                return False
            poll = parse_poll(data)
            if poll is None:
                return False
            query, headers = poll
            skip = _skip_current_image(query)
            if skip is None or guard.refusal("GET", headers) is not None:
                return False
            self._unset_keepalive_if_required()
            body = progress_body(server, skip)
            head = [b"HTTP/1.1 200 OK\r\n"]
            for name, value in [*self.server_state.default_headers, *HEADERS,
                                (b"content-length", str(len(body)).encode())]:
                head += [name, b": ", value, b"\r\n"]
            self.transport.write(b"".join([*head, b"\r\n", body]))
            self.server_state.total_requests += 1
            # as uvicorn does after each response: an idle keep-alive connection is closed in time
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
            return True

    return PollingProtocol
