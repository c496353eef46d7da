"""The server's own HTTP protocol answers plain progress polls at the socket, and everything else as
uvicorn does: the same bytes in, the same answers out, against a server on uvicorn's h11 protocol.

Both servers run in this process on loopback ports; requests are raw bytes, so the odd ones
(pipelined, split over two writes, folded headers, HTTP/1.0) arrive exactly as written.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import h11
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.h11_impl import H11Protocol

from server_harness import fastapi_app, free_port, model_folder
from sdgen.server.app import create_app
from sdgen.server.config import ServerConfig
from sdgen.server.progress import parse_poll, polling_protocol

AUTH = "artist:s3cret"
BASIC = "Authorization: Basic YXJ0aXN0OnMzY3JldA==\r\n"  # artist:s3cret
POLL = b"GET /sdapi/v1/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@contextmanager
def live_server(tmp_path, name: str, polling: bool, **config):
    """create_app's app served by uvicorn in a thread: with the polling protocol, or uvicorn's h11 one."""
    app = create_app(ServerConfig(data_dir=tmp_path / name, model=model_folder(), **config))
    protocol = polling_protocol(app, fastapi_app(app).state.server) if polling else "h11"
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           http=protocol, timeout_keep_alive=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Connection:
    """One client socket; sends raw bytes and reads whole responses (Content-Length framed)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, *chunks: bytes) -> Connection:
        for chunk in chunks:
            self.sock.sendall(chunk)
            time.sleep(0.05)  # separate reads on the server side
        return self

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def response(self, has_body: bool = True) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), "connection closed before a response"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", 0)) if has_body else 0
        while len(self.buffer) < length:
            assert self._fill(), "connection closed inside a body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        """True when the server closed the connection (reads end), with nothing more sent."""
        return not self._fill()

    def close(self) -> None:
        self.sock.close()


def answers(port: int, chunks: list[bytes], count: int) -> list[tuple[int, str | None, bytes]]:
    """(status, content type, body) of the first `count` answers to `chunks` sent on one connection."""
    connection = Connection(port).send(*chunks)
    has_body = not chunks[0].startswith(b"HEAD ")
    try:
        return [(status, headers.get("content-type"), body)
                for status, headers, body in (connection.response(has_body) for _ in range(count))]
    finally:
        connection.close()


def request(target: str = "/sdapi/v1/progress", headers: str = "Host: 127.0.0.1\r\n", method: str = "GET",
            version: str = "1.1") -> bytes:
    return f"{method} {target} HTTP/{version}\r\n{headers}\r\n".encode("latin-1")


BROWSER = ("Host: 127.0.0.1:7860\r\nUser-Agent: Mozilla/5.0\r\nAccept: */*\r\nAccept-Language: en\r\n"
           "Connection: keep-alive\r\nReferer: http://127.0.0.1:7860/\r\nSec-Fetch-Site: same-origin\r\n")
# (name, request chunks, responses expected, answered by the polling protocol itself)
CASES = [
    ("plain", [POLL], 1, True),
    ("skip flag", [request("/sdapi/v1/progress?skip_current_image=true")], 1, True),
    ("a browser's headers", [request(headers=BROWSER)], 1, True),
    ("bad flag: FastAPI's 422", [request("/sdapi/v1/progress?skip_current_image=maybe")], 1, False),
    ("unknown Host: the Guard's 403", [request(headers="Host: evil.example\r\n")], 1, False),
    ("no Host: h11's 400", [request(headers="")], 1, False),
    ("two Host headers", [request(headers="Host: 127.0.0.1\r\nHost: evil.example\r\n")], 1, False),
    ("Connection: close", [request(headers="Host: 127.0.0.1\r\nConnection: close\r\n")], 1, False),
    ("HTTP/1.0", [request(version="1.0")], 1, False),
    ("a Content-Length", [request(headers="Host: 127.0.0.1\r\nContent-Length: 0\r\n")], 1, False),
    ("a folded header", [request(headers="Host: 127.0.0.1\r\nX-A: 1\r\n  2\r\n")], 1, False),
    ("HEAD", [request(method="HEAD")], 1, False),
    ("POST: 405", [request(method="POST", headers="Host: 127.0.0.1\r\nContent-Length: 0\r\n")], 1, False),
    ("trailing slash: FastAPI's redirect", [request("/sdapi/v1/progress/")], 1, False),
    ("a longer path", [request("/sdapi/v1/progressive")], 1, False),
    ("pipelined", [POLL * 2], 2, False),
    ("split over two reads", [POLL[:20], POLL[20:]], 1, False),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("polling")
    with live_server(tmp, "polling", True) as polling, live_server(tmp, "plain", False) as plain:
        yield polling, plain


@pytest.fixture
def answered_at_socket(monkeypatch):
    """Counts requests of polling-protocol connections that reached uvicorn's own handling."""
    reached = []
    original = H11Protocol.data_received

    def counting(self, data):
        if type(self) is not H11Protocol:
            reached.append(data)
        return original(self, data)

    monkeypatch.setattr(H11Protocol, "data_received", counting)
    return reached


@pytest.mark.parametrize("name, chunks, count, fast", CASES, ids=[case[0] for case in CASES])
def test_answers_as_uvicorn_does(servers, answered_at_socket, name, chunks, count, fast):
    polling, plain = servers
    got, expected = answers(polling, chunks, count), answers(plain, chunks, count)
    assert got == expected
    assert (not answered_at_socket) == fast
    if fast:
        status, content_type, body = got[0]
        assert status == 200 and content_type == "application/json" and "state" in json.loads(body)


def test_auth_is_checked_before_answering(tmp_path, answered_at_socket):
    with live_server(tmp_path, "auth", True, api_auth=AUTH) as port:
        assert answers(port, [POLL], 1)[0][0] == 401
        assert answers(port, [request(headers="Host: 127.0.0.1\r\nAuthorization: Basic bm86bm8=\r\n")], 1)[0][0] == 401
        assert len(answered_at_socket) == 2
        status, _, body = answers(port, [request(headers=f"Host: 127.0.0.1\r\n{BASIC}")], 1)[0]
        assert status == 200 and json.loads(body)["progress"] == 0
        assert len(answered_at_socket) == 2  # the authorised poll was answered at the socket


def test_one_connection_mixes_polls_and_other_requests(servers, answered_at_socket):
    polling, _ = servers
    connection = Connection(polling)
    try:
        for chunk in (POLL, request("/api/v1/health"), POLL, request("/sdapi/v1/samplers"), POLL):
            status, _, body = connection.send(chunk).response()
            assert status == 200, body
            assert ("state" in json.loads(body)) == (chunk == POLL)
    finally:
        connection.close()
    assert len(answered_at_socket) == 2  # health and samplers


def test_keep_alive_timeout_still_closes_idle_connections(servers):
    """Polls keep a connection open (each answer re-arms the 1 s timer); silence closes it."""
    polling, _ = servers
    connection = Connection(polling)
    try:
        for _ in range(6):
            assert connection.send(POLL).response()[0] == 200
            time.sleep(0.3)
        connection.sock.settimeout(5)
        started = time.monotonic()
        assert connection.closed()
        assert time.monotonic() - started < 3
    finally:
        connection.close()


TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_.!#~", min_size=1, max_size=12)
VALUE = st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=20)


@settings(max_examples=300, deadline=None)
@given(query=st.one_of(st.none(), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)),
       headers=st.lists(st.tuples(st.one_of(TOKEN, st.sampled_from(["Host", "Connection", "Content-Length"])),
                                  VALUE), max_size=5),
       host=st.booleans())
def test_a_poll_it_accepts_reads_the_same_in_h11(query, headers, host):
    """Whatever the parser accepts, h11 reads as the same GET of the same target with the same headers."""
    target = "/sdapi/v1/progress" + ("" if query is None else f"?{query}")
    lines = [("Host", "127.0.0.1")] * host + headers
    data = request(target, "".join(f"{k}:{v}\r\n" for k, v in lines))
    parsed = parse_poll(data)
    if parsed is None:
        return
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data)
    event = connection.next_event()
    assert isinstance(event, h11.Request) and event.method == b"GET" and event.target == target.encode()
    assert parsed[0] == (b"" if query is None else query.encode())
    assert {k.decode(): v.decode() for k, v in event.headers} == parsed[1]
    assert isinstance(connection.next_event(), h11.EndOfMessage)


def _resident_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_clients_that_never_read_do_not_grow_the_server(servers):
    """Polls written for 3 s on two connections and never read: the answers wait in bounded
    buffers (the server stops reading), memory stays flat and another client is answered."""
    polling, _ = servers
    before = _resident_mib()
    floods = [socket.create_connection(("127.0.0.1", polling)) for _ in range(2)]
    sent, deadline = 0, time.monotonic() + 3
    try:
        for flood in floods:
            flood.setblocking(False)
        while time.monotonic() < deadline:
            for flood in floods:
                try:
                    flood.send(POLL)
                    sent += 1
                except BlockingIOError:
                    time.sleep(0.001)
        assert answers(polling, [POLL], 1)[0][0] == 200
        assert sent > 10_000
        assert _resident_mib() - before < 100, f"{sent} polls grew this process by {_resident_mib() - before:.0f} MiB"
    finally:
        for flood in floods:
            flood.close()
