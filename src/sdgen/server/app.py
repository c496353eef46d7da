"""Wiring: the `Server` (store, catalog, worker, options), the FastAPI app, and `serve()` for `sdgen serve`."""

from __future__ import annotations

import asyncio
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

import sdgen
from sdgen.errors import UserError
from sdgen.pipelines.request import RequestError, check_int_range
from sdgen.server import a1111, native
from sdgen.server.catalog import Catalog
from sdgen.server.config import ServerConfig
from sdgen.server.progress import ProgressShortcut, polling_protocol
from sdgen.server.security import Guard
from sdgen.server.store import FINAL, Job, QueueFull, Store
from sdgen.server.worker import Worker

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
RETRY_AFTER_SECONDS = 10
# The UI loads nothing from elsewhere; previews come as data: URLs, gallery images from /api/v1/images.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class Server:
    """Everything the routes share; built once per process."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.store = Store(config.data_dir, max_queue=config.max_queue)
        self.recovered = self.store.recover()
        self.catalog = Catalog(config.data_dir, config.model, config.models_dir)
        self.worker = Worker(self.store, self.catalog, device=config.device, dtype=config.dtype, fast=config.fast,
                             preview_every=config.preview_every, preview_decoder=config.preview_decoder)
        self.options: dict[str, Any] = {}

    def submit(self, kind: str, params: dict) -> Job:
        """Queue a job (durably) and wake the worker; 503 with Retry-After when the queue is full."""
        try:
            job = self.store.add_job(kind, params)
        except QueueFull as error:
            raise HTTPException(status_code=503, detail=f"{error}; retry later",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        self.worker.wake()
        return job

    async def wait(self, job_id: str) -> Job:
        """Until the job is over: woken by the worker the moment it ends, checking the database each second."""
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ended.set)
            except RuntimeError:  # this request's event loop has closed; nobody is waiting any more
                pass

        unsubscribe = self.worker.on_done(job_id, wake)
        try:
            while True:
                # cleared before reading the store: an ending after the read still sets it
                ended.clear()
                job = self.store.job(job_id)
                if job is None or job.state in FINAL:
                    return job
                try:
                    await asyncio.wait_for(ended.wait(), timeout=1.0)
                except TimeoutError:
                    pass
        finally:
            unsubscribe()

    def current_options(self) -> dict[str, Any]:
        """A1111's options: the ones sdgen honours, then whatever clients stored."""
        entry = self.catalog.find(self.options.get("sd_model_checkpoint")) or self.catalog.default
        return {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
                "show_progress_every_n_steps": self.config.preview_every, "live_previews_enable": True,
                "show_progress_type": "TAESD" if self.worker.tiny_decoder or self.worker.preview_decoder else "Approx cheap",
                "outdir_samples": str(self.store.outputs),
                **self.options, "sd_model_checkpoint": entry.title, "sd_checkpoint_hash": entry.sha256}

    def set_options(self, options: dict[str, Any]) -> None:
        """Validate then store; settings live in memory only and none of them touches security."""
        if "sd_model_checkpoint" in options:
            name = options["sd_model_checkpoint"]
            if not isinstance(name, str):
                raise RequestError(f"sd_model_checkpoint: expected a model title, got {name!r}")
            options = {**options, "sd_model_checkpoint": self.catalog.require(name, "sd_model_checkpoint").title}
        if "CLIP_stop_at_last_layers" in options:
            check_int_range("CLIP_stop_at_last_layers", options["CLIP_stop_at_last_layers"], 1, 12)
        self.options.update(options)


def create_app(config: ServerConfig, server: Server | None = None) -> Guard:
    """The ASGI app: A1111 routes, native routes and the web UI (a FastAPI app) behind the progress shortcut
    and the Guard middleware."""
    server = server or Server(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()
            server.store.close()

    # FastAPIOffline: /docs and /redoc serve Swagger UI and ReDoc from the installed package, not a CDN,
    # so the API documentation works on machines without internet access.
    app = FastAPIOffline(title="sdgen", version=sdgen.__version__, lifespan=lifespan,
                  description="Stable Diffusion server: AUTOMATIC1111-compatible `/sdapi/v1` routes and "
                              "sdgen's own `/api/v1` (jobs, progress events, gallery).")
    app.state.server = server

    @app.exception_handler(UserError)
    async def user_error(_: Request, error: UserError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": type(error).__name__, "detail": str(error)})

    app.include_router(a1111.router(server))
    app.include_router(native.router(server))

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEBUI_DIR / "index.html", headers={**UI_HEADERS, "Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=WEBUI_DIR), name="static")

    guarded = Guard(ProgressShortcut(app, server), credentials=config.credentials(),
                    allowed_hosts=config.allowed_hosts,
                    any_host=config.listens_publicly, max_body_bytes=config.max_body_bytes)
    return guarded


WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! sdgen serve --listen --insecure: the server accepts requests from ANY      !!
!! machine that can reach this one, WITHOUT a password. Anyone on the network !!
!! can generate images, read your gallery and fill your disk.                 !!
!! Use --api-auth user:password instead.                                      !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def check_exposure(config: ServerConfig) -> None:
    """Refuse to listen on every interface without credentials unless told --insecure (then warn loudly)."""
    try:
        config.credentials()  # a malformed --api-auth fails here, before anything starts
    except ValueError as error:
        raise UserError(str(error)) from None
    if config.listens_publicly and not config.api_auth:
        if not config.insecure:
            raise UserError("--listen needs --api-auth user:password (or --insecure to serve the network "
                            "without a password)")
        print(WARNING, file=sys.stderr, flush=True)


def serve(config: ServerConfig) -> None:
    """Run the server until interrupted (uvicorn, one process, one generation thread)."""
    import uvicorn

    check_exposure(config)
    server = Server(config)
    for notice in server.store.notices:
        print(f"sdgen: warning: {notice}", file=sys.stderr, flush=True)
    if server.recovered["requeued"] or server.recovered["failed"]:
        print(f"sdgen: after an unclean stop: {server.recovered['requeued']} job(s) re-queued, "
              f"{server.recovered['failed']} failed", file=sys.stderr, flush=True)
    host = "[::1]" if config.host == "::1" else config.host
    print(f"sdgen: serving on http://{host}:{config.port}/ (data in {server.store.data_dir})",
          file=sys.stderr, flush=True)
    app = create_app(config, server)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5,
                http=polling_protocol(app, server))
