"""The API documentation pages work offline: /docs (Swagger UI) and /redoc load every asset from the server."""

from __future__ import annotations

import re

import httpx
import pytest

from server_harness import ServerProcess

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("docs") / "data") as running:
        yield running


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_documentation_page_needs_no_other_host(server, page):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        html = client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        outside = [url for url in re.findall(r"https?://[^\s\"'<>)]+", html.text)
                   if not url.startswith(server.url)]
        assert outside == [], f"{page} loads from other hosts: {outside}"
        assets = [a or b for a, b in ASSET.findall(html.text)]
        assert any(url.endswith(".js") for url in assets)
        for url in assets:
            response = client.get(url)
            assert response.status_code == 200 and response.content, url
        assert client.get("/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]
