"""AUTOMATIC1111-compatible routes under `/sdapi/v1` (field names, types and defaults of A1111 1.10).

txt2img and img2img are synchronous for the client, as in A1111, but go through the same
persistent queue as native jobs: the handler queues the job and waits for it.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, HTTPException
from PIL import Image

from sdgen.diffusion.registry import list_samplers, list_schedulers
from sdgen.pipelines.infotext import parse_infotext
from sdgen.pipelines.request import RequestError
from sdgen.server import jobs, schemas

if TYPE_CHECKING:
    from sdgen.server.app import Server

EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def _b64_file(path) -> str:
    with open(path, "rb") as handle:
        return base64.b64encode(handle.read()).decode()


def _exif_comment(image: Image.Image) -> str | None:
    """A1111's JPEG/WEBP infotext: EXIF UserComment with an 8-byte character-code prefix."""
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    code, text = raw[:8], raw[8:]
    if code.startswith(b"UNICODE"):
        encoding = "utf-16-le" if text[:1] != b"\x00" and text[1:2] == b"\x00" else "utf-16-be"
        return text.decode(encoding, errors="replace")
    return text.decode("utf-8", errors="replace")


def png_info(image: Image.Image) -> dict:
    """`/sdapi/v1/png-info`: the infotext, the image's other text items, and the parsed fields."""
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, (str, int, float))}
    info = items.pop("parameters", None)
    if info is None and image.format in ("JPEG", "WEBP"):
        info = _exif_comment(image)
    info = info if isinstance(info, str) else ""
    return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}


def progress_response(server: Server, skip_current_image: bool) -> schemas.ProgressResponse:
    """A1111's progress: the running job's fraction (0..1), ETA, state and the cached preview PNG."""
    snapshot = server.worker.snapshot()
    if not snapshot.job:
        return schemas.ProgressResponse(progress=0, eta_relative=0, state=snapshot.state(), textinfo=snapshot.textinfo)
    current = None
    if not skip_current_image:
        preview = server.worker.preview_png()
        current = base64.b64encode(preview).decode() if preview is not None else None
    return schemas.ProgressResponse(progress=snapshot.fraction(), eta_relative=snapshot.eta(),
                                    state=snapshot.state(), current_image=current, textinfo=snapshot.textinfo)


def router(server: "Server") -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])

    async def run(request: schemas.GenerationFields, kind: str) -> schemas.GenerationResponse:
        params = jobs.build_params(request, kind, server.catalog, server.options, server.config.limits)
        if kind == "img2img":
            jobs.save_inputs(request, params, server.store, server.config.limits)
        job = await server.wait(server.submit(kind, params).id)
        if job.state == "failed":
            raise HTTPException(status_code=500, detail=job.error or "the job failed")
        images = [_b64_file(server.store.outputs / row["path"]) for row in server.store.images_for(job.id)]
        return schemas.GenerationResponse(images=images if request.send_images is not False else [],
                                          parameters=jobs.echo_parameters(request, params), info=jobs.info_json(job))

    @api.post("/txt2img", response_model=schemas.GenerationResponse)
    async def txt2img(request: schemas.Txt2ImgRequest) -> schemas.GenerationResponse:
        """Text to image; waits for the job and returns base64 PNGs and A1111's `info` JSON string."""
        return await run(request, "txt2img")

    @api.post("/img2img", response_model=schemas.GenerationResponse)
    async def img2img(request: schemas.Img2ImgRequest) -> schemas.GenerationResponse:
        """Image to image; with `mask` (white = repaint), inpainting."""
        return await run(request, "img2img")

    @api.get("/progress", response_model=schemas.ProgressResponse)
    async def progress(skip_current_image: bool = False) -> schemas.ProgressResponse:
        """The running job's progress (0..1), ETA and A1111 state; `current_image` is the cheap preview."""
        # Polls are normally answered before this (`progress.polling_protocol` at the socket,
        # `progress.ProgressShortcut` in ASGI); this route documents the schema and answers the
        # queries they leave to FastAPI's validation.
        return progress_response(server, skip_current_image)

    @api.post("/interrupt")
    def interrupt() -> dict:
        """Stop the running job at its next step; finished images and the current one are kept."""
        server.worker.interrupt()
        return {}

    @api.post("/skip")
    def skip() -> dict:
        """Drop the current batch iteration of the running job and go on with the next."""
        server.worker.skip()
        return {}

    @api.get("/options")
    def get_options() -> dict[str, Any]:
        return server.current_options()

    @api.post("/options")
    def set_options(options: dict[str, Any] = Body(...)) -> dict:
        """Settings; `sd_model_checkpoint` picks the model later jobs use, `CLIP_stop_at_last_layers` clip skip."""
        server.set_options(options)
        return {}

    @api.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        config = server.config
        return {"listen": config.listens_publicly, "port": config.port, "api": True, "nowebui": False,
                "data_dir": str(config.data_dir), "ckpt_dir": config.models_dir, "api_auth": None}

    @api.get("/sd-models", response_model=list[schemas.SDModelItem])
    def sd_models() -> list[dict]:
        return [entry.item() for entry in server.catalog.entries]

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict:
        server.catalog.refresh()
        return {}

    @api.get("/samplers", response_model=list[schemas.SamplerItem])
    def samplers() -> list[dict]:
        return list_samplers()

    @api.get("/schedulers", response_model=list[schemas.SchedulerItem])
    def schedulers() -> list[dict]:
        return list_schedulers()

    @api.get("/sd-vae", response_model=list[schemas.SDVaeItem])
    def sd_vae() -> list[dict]:
        return []

    @api.post("/refresh-vae")
    def refresh_vae() -> dict:
        return {}

    @api.get("/upscalers", response_model=list[schemas.UpscalerItem])
    def upscalers() -> list[dict]:
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]

    @api.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict]:
        return []

    @api.get("/embeddings", response_model=schemas.EmbeddingsResponse)
    def embeddings() -> dict:
        return {"loaded": {}, "skipped": {}}

    @api.get("/loras")
    def loras() -> list[dict]:
        return []

    @api.post("/refresh-loras")
    def refresh_loras() -> dict:
        return {}

    @api.get("/hypernetworks")
    def hypernetworks() -> list[dict]:
        return []

    @api.get("/face-restorers")
    def face_restorers() -> list[dict]:
        return []

    @api.get("/prompt-styles")
    def prompt_styles() -> list[dict]:
        return []

    @api.get("/scripts")
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @api.get("/script-info")
    def script_info() -> list[dict]:
        return []

    @api.post("/png-info", response_model=schemas.PNGInfoResponse)
    def png_info_route(request: schemas.PNGInfoRequest) -> dict:
        """The generation parameters stored in an image (PNG text chunk, or JPEG/WEBP EXIF)."""
        try:
            image = jobs.decode_image(request.image, "image", server.config.limits)
        except RequestError:
            if not request.image.strip():
                return {"info": "", "items": {}, "parameters": {}}
            raise
        return png_info(image)

    return api
