"""sdgen's own API under `/api/v1`: asynchronous jobs with ids, progress as server-sent events, the gallery.

A job is queued and answered at once (202 with its id); `GET /api/v1/jobs/{id}/events` streams
`progress` events (with a small live preview as a data URL when a new one exists) and a final
`done` event carrying the job. Gallery images are addressed by id only, never by path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse, Response, StreamingResponse

from sdgen.server import jobs, schemas
from sdgen.server.store import FINAL, Job

if TYPE_CHECKING:
    from sdgen.server.app import Server

EVENT_INTERVAL = 0.25
HEARTBEAT_SECONDS = 15.0
SQLITE_MAX_INT = 2**63 - 1


def image_item(row: dict) -> dict:
    """A gallery image as the API lists it."""
    return {"id": row["id"], "url": f"/api/v1/images/{row['id']}", "job_id": row["job_id"], "prompt": row["prompt"],
            "negative_prompt": row["negative_prompt"], "seed": row["seed"], "width": row["width"],
            "height": row["height"], "model": row["model"], "infotext": row["infotext"], "created": row["created"]}


def router(server: "Server") -> APIRouter:
    api = APIRouter(prefix="/api/v1", tags=["sdgen"])

    def job_or_404(job_id: str) -> Job:
        job = server.store.job(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        return job

    def progress_of(job: Job) -> dict:
        """Where a job stands: its place in the queue, or the running job's step and ETA."""
        if job.state == "queued":
            return {"state": "queued", "position": server.store.position(job.id)}
        snapshot = server.worker.snapshot()
        if job.state == "running" and snapshot.job == job.id:
            return {"state": "running", "progress": snapshot.fraction(), "eta": snapshot.eta(),
                    "step": snapshot.sampling_step, "steps": snapshot.sampling_steps, "job_no": snapshot.job_no,
                    "job_count": snapshot.job_count, "preview_step": snapshot.preview_step,
                    "textinfo": snapshot.textinfo}
        return {"state": job.state}

    def detail(job: Job) -> dict:
        body = job.public()
        body["progress"] = progress_of(job)
        body["images"] = [image_item(row) for row in server.store.images_for(job.id)]
        body["info"] = jobs.info_dict(job) if job.state in ("done", "interrupted") else None
        return body

    @api.post("/jobs", status_code=202, response_model=schemas.JobAccepted)
    def create_job(request: schemas.JobRequest) -> dict:
        """Queue txt2img, or img2img when `init_images` is given (inpainting with `mask`); answers at once."""
        kind = jobs.job_kind(request)
        params = jobs.build_params(request, kind, server.catalog, server.options, server.config.limits)
        if kind == "img2img":
            jobs.save_inputs(request, params, server.store, server.config.limits)
        job = server.submit(kind, params)
        return {"id": job.id, "state": job.state, "position": server.store.position(job.id),
                "url": f"/api/v1/jobs/{job.id}", "events": f"/api/v1/jobs/{job.id}/events"}

    @api.get("/jobs")
    def list_jobs(limit: int = Query(50, ge=1, le=500)) -> list[dict]:
        return [job.public() | {"progress": progress_of(job)} for job in server.store.jobs(limit)]

    @api.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return detail(job_or_404(job_id))

    @api.delete("/jobs/{job_id}")
    def cancel_job(job_id: str) -> dict:
        """Cancel a queued job, or interrupt it if it is running."""
        job = job_or_404(job_id)
        if not server.store.cancel(job_id):
            server.worker.interrupt(job_id)
        return {"id": job.id, "state": server.store.job(job_id).state}

    @api.get("/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-sent events: `progress` while queued or running, then one `done` with the job."""
        job_or_404(job_id)

        async def stream():
            last, last_preview, last_sent = None, -1, time.monotonic()
            while True:
                job = server.store.job(job_id)
                if job is None or job.state in FINAL:
                    yield f"event: done\ndata: {json.dumps(detail(job) if job else {'id': job_id})}\n\n"
                    return
                data = progress_of(job)
                if data.get("preview_step", -1) != last_preview:
                    last_preview = data["preview_step"]
                    preview = server.worker.preview_png()
                    if preview is not None:
                        data["preview"] = "data:image/png;base64," + base64.b64encode(preview).decode()
                if data != last:
                    last, last_sent = data, time.monotonic()
                    yield f"event: progress\ndata: {json.dumps(data)}\n\n"
                elif time.monotonic() - last_sent > HEARTBEAT_SECONDS:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(EVENT_INTERVAL)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @api.get("/gallery")
    def gallery(q: str = Query("", max_length=1000, description="text to find in the prompt or negative prompt"),
                limit: int = Query(60, ge=1, le=500), before: int | None = Query(None, ge=0, le=SQLITE_MAX_INT)) -> dict:
        """Gallery images, newest first; page with `before` = the last id seen."""
        return {"images": [image_item(row) for row in server.store.gallery(q, limit, before)]}

    @api.get("/images/{image_id}", response_class=FileResponse)
    def image_file(image_id: int = Path(ge=0, le=SQLITE_MAX_INT)) -> FileResponse:
        path = server.store.image_path(image_id)
        if path is None:
            raise HTTPException(status_code=404, detail=f"no image {image_id}")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @api.get("/preview")
    def preview() -> Response:
        """The running job's latest cheap preview as a PNG (204 when there is none)."""
        preview = server.worker.preview_png()
        if preview is None:
            return Response(status_code=204)
        return Response(preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    @api.get("/health")
    def health() -> dict:
        loaded = server.worker.loaded
        return {"status": "ok", "queued": server.store.active_count(), "max_queue": server.config.max_queue,
                "model": server.options.get("sd_model_checkpoint") or server.catalog.default.title,
                "loaded": loaded.title if loaded else None, "native_size": server.worker.native_size,
                "notices": server.store.notices}

    return api
