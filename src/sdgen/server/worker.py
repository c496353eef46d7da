"""The one generation thread: takes queued jobs in order, runs them, records images and progress.

One job generates at a time, server-wide. Progress follows AUTOMATIC1111's `shared.state`
(job_count = batch iterations, job_no, sampling_step, sampling_steps, skipped, interrupted).
Interrupt keeps the finished iterations and the current one as it stands (A1111's behaviour),
skip drops the current iteration and goes on with the next (later images keep seed + i).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sdgen
from sdgen.checkpoints.errors import CheckpointError
from sdgen.diffusion.samplers import Interrupted
from sdgen.errors import UserError
from sdgen.models.tiny_decoder import TinyDecoder, folder_tiny_decoder, load_tiny_decoder
from sdgen.pipelines.loading import embedded_model_path
from sdgen.pipelines.request import GenerationRequest, Img2ImgRequest
from sdgen.runtime.fast import accelerate, accelerate_pipeline
from sdgen.server.catalog import Catalog, CheckpointEntry
from sdgen.server.config import MODEL_PREVIEW_DECODER
from sdgen.server.previews import fit_preview_map, png_bytes, preview_image, tiny_preview_pixels
from sdgen.server.store import Job, Store


class JobFailed(Exception):
    """A job that cannot run as asked (its model is gone, img2img missing); the message says why."""


@dataclass
class Progress:
    """A snapshot of the running job, in A1111's `shared.state` terms."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    job_timestamp: str = "0"
    skipped: bool = False
    interrupted: bool = False
    textinfo: str | None = None
    preview_latents: torch.Tensor | None = field(default=None, repr=False)
    preview_pixels: np.ndarray | None = field(default=None, repr=False)  # from the tiny decoder, when there is one
    preview_step: int = -1

    def state(self) -> dict:
        """A1111's `state.dict()`."""
        return {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp,
                "job_no": self.job_no, "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}

    def fraction(self) -> float:
        """A1111's progress: 0.01 + done iterations + the current one's step share, capped at 1."""
        if not self.job_count:
            return 0.0
        value = 0.01 + self.job_no / self.job_count
        if self.sampling_steps:
            value += self.sampling_step / self.sampling_steps / self.job_count
        return min(value, 1.0)

    def eta(self) -> float:
        """Seconds left, extrapolated from the time spent so far (A1111's eta_relative)."""
        if not self.job_count:
            return 0.0
        spent = time.time() - self.time_start
        return spent / self.fraction() - spent


PREVIEW_WATCH_SECONDS = 5.0  # previews fetched this recently: the tiny decoder runs for the next ones


class Worker:
    """Runs jobs from `store` one at a time on a daemon thread; loads models from `catalog` on demand."""

    def __init__(self, store: Store, catalog: Catalog, *, device: str = "auto", dtype: str = "fp32", fast: bool = False,
                 preview_every: int = 3, preview_decoder: Path | str | None = None):
        self.store, self.catalog = store, catalog
        self.device, self.dtype, self.fast, self.preview_every = device, dtype, fast, preview_every
        # read at start, so that a wrong path stops `sdgen serve` with one line before it listens
        self.folder_decoders = preview_decoder == MODEL_PREVIEW_DECODER  # each model folder's own
        self.preview_decoder: TinyDecoder | None = (
            load_tiny_decoder(preview_decoder) if preview_decoder and not self.folder_decoders else None)
        self.tiny_decoder: TinyDecoder | None = None  # the one the loaded model's previews use, if any
        self._preview_fetched = -float("inf")  # time.monotonic() of the last preview_png()
        self.pipeline = None
        self.loaded: CheckpointEntry | None = None
        self.preview_map: torch.Tensor | None = None
        self.progress = Progress()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._on_done: dict[str, list[Callable[[], None]]] = {}
        self._preview_cache: tuple[tuple[str, int] | None, bytes | None] = (None, None)
        self._thread = threading.Thread(target=self._run, name="sdgen-worker", daemon=True)

    # Control from the HTTP threads -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.interrupt()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop the running job (only if it is `job_id`, when given) at its next step."""
        with self._lock:
            if not self.progress.job or (job_id is not None and job_id != self.progress.job):
                return False
            self.progress.interrupted = True
            return True

    def skip(self) -> None:
        with self._lock:
            if self.progress.job:
                self.progress.skipped = True

    def snapshot(self) -> Progress:
        with self._lock:
            return replace(self.progress)

    def on_done(self, job_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the worker thread) when the job ends here; returns the unsubscriber.

        A job that ended before this call, or that ends elsewhere (cancelled while queued), never
        calls back: waiters check the store after subscribing and now and then.
        """
        with self._lock:
            self._on_done.setdefault(job_id, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._on_done.get(job_id, [])
                if callback in callbacks:
                    callbacks.remove(callback)
                if not callbacks:
                    self._on_done.pop(job_id, None)

        return unsubscribe

    def preview_png(self) -> bytes | None:
        """The latest live preview of the running job as PNG bytes (None before its first).

        Encoded once per new preview: clients polling progress many times a second reuse it.
        """
        self._preview_fetched = time.monotonic()  # someone is watching: tiny-decode the next previews
        with self._lock:
            latents, pixels, weights = self.progress.preview_latents, self.progress.preview_pixels, self.preview_map
            key = (self.progress.job, self.progress.preview_step)
            if self._preview_cache[0] == key:
                return self._preview_cache[1]
        if pixels is not None:
            data = png_bytes(Image.fromarray(pixels))
        elif latents is None or weights is None:
            return None
        else:
            data = png_bytes(preview_image(latents, weights))
        with self._lock:
            self._preview_cache = (key, data)
        return data

    @property
    def native_size(self) -> int | None:
        return self.pipeline.native_size if self.pipeline is not None else None

    # The thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self.store.next_queued()
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._process(job)

    def _process(self, job: Job) -> None:
        self.store.mark_running(job.id)
        params = job.params
        iterations = int(params.get("n_iter", 1))
        with self._lock:
            self.progress = Progress(job=job.id, job_count=iterations, time_start=time.time(),
                                     job_timestamp=datetime.now().strftime("%Y%m%d%H%M%S"),
                                     sampling_steps=int(params["steps"]))
        try:
            state, result = self._generate(job)
            self.store.finish(job.id, state, result=result)
        except Exception as error:  # a failing job must never stop the worker
            message = str(error) or type(error).__name__
            if not isinstance(error, (JobFailed, UserError, ValueError)):
                traceback.print_exc()
                message = f"{type(error).__name__}: {message}"
            self.store.finish(job.id, "failed", error=message)
        finally:
            with self._lock:
                self.progress = Progress()
                callbacks = self._on_done.pop(job.id, [])
            for callback in callbacks:
                callback()

    def _ensure_model(self, title: str | None) -> CheckpointEntry:
        entry = self.catalog.find(title)
        if entry is None:
            raise JobFailed(f"model {title!r} is no longer available; see /sdapi/v1/sd-models")
        if self.loaded is None or self.loaded.title != entry.title or self.pipeline is None:
            self.pipeline, self.preview_map, self.tiny_decoder = None, None, None
            with self._lock:
                self.progress.textinfo = f"loading {entry.title}"
            pipeline = sdgen.load(entry.path, device=self.device, dtype=self.dtype)
            if self.fast:
                accelerate_pipeline(pipeline)
            try:
                cfg = pipeline.vae.cfg
                self.preview_map = fit_preview_map(pipeline.vae, cfg.scaling_factor, cfg.shift_factor or 0.0)
            except Exception:  # previews are a convenience; a model without them still generates
                self.preview_map = None
            decoder = self._fitting_tiny_decoder(entry, pipeline)
            if decoder is not None:
                decoder.to(device=pipeline.device, dtype=next(pipeline.vae.parameters()).dtype)
                if self.fast:
                    accelerate(decoder)
                self.tiny_decoder = decoder
            self.pipeline, self.loaded = pipeline, entry
            with self._lock:
                self.progress.textinfo = None
        return entry

    def _fitting_tiny_decoder(self, entry: CheckpointEntry, pipeline) -> TinyDecoder | None:
        """The preview decoder for this model: the user's if it fits the model's latents, or with
        `--preview-decoder model` the model folder's own; None: linear previews. A folder's file
        that cannot be read costs only the better previews."""
        def fits(decoder: TinyDecoder | None) -> bool:
            return (decoder is not None and decoder.cfg.latent_channels == pipeline.vae.cfg.latent_channels
                    and decoder.upscale == pipeline.latent_factor)

        if not self.folder_decoders:
            return self.preview_decoder if fits(self.preview_decoder) else None
        path = folder_tiny_decoder(entry.path)
        if path is None:
            return None
        try:
            own = load_tiny_decoder(path)
        except CheckpointError as error:
            print(f"sdgen: warning: {error}; previews use the linear map", file=sys.stderr, flush=True)
            return None
        return own if fits(own) else None

    def _on_step(self, image_index: int, step: int, total: int, denoised: torch.Tensor) -> None:
        preview = bool(self.preview_every) and (step % self.preview_every == 0 or step + 1 == total)
        # the tiny decoder runs here, on the worker's own threads, not in a request thread, and only
        # while someone fetches previews: for a small model it costs as much as several steps
        watched = time.monotonic() - self._preview_fetched < PREVIEW_WATCH_SECONDS
        decoder = self.tiny_decoder
        pixels = tiny_preview_pixels(decoder, denoised[:1]) if preview and watched and decoder is not None else None
        with self._lock:
            progress = self.progress
            progress.sampling_step, progress.sampling_steps = step + 1, total
            if preview:
                progress.preview_latents = denoised[0].detach().float().cpu().clone()
                progress.preview_pixels = pixels
                progress.preview_step = step
            stop = progress.interrupted or progress.skipped
        if stop:
            raise Interrupted()

    def _generate(self, job: Job) -> tuple[str, dict]:
        params = job.params
        entry = self._ensure_model(params.get("model"))
        pipeline = self.pipeline
        request = self._request(job, pipeline)
        iterations, batch = int(params.get("n_iter", 1)), request.batch_size
        folder = self.store.outputs / datetime.now().strftime("%Y-%m-%d")
        # A job re-run after a crash resumes after its last complete iteration (same seeds, same pixels).
        kept = self.store.keep_complete_iterations(job.id, batch)
        seeds = [row["seed"] for row in kept]
        infotexts = [row["infotext"] for row in kept]
        subseeds: list[int | None] = [None] * len(kept)  # not stored per image: unknown after a resume
        image_ids = [row["id"] for row in kept]
        skipped, state = 0, "done"
        all_seeds, all_subseeds = request.image_seeds()
        for iteration in range(len(kept) // batch, iterations):
            with self._lock:
                self.progress.job_no, self.progress.sampling_step = iteration, 0
                self.progress.skipped = False
                if self.progress.interrupted:
                    state = "interrupted"
                    break
            first = iteration * batch
            part = replace(request, seed=all_seeds[first], subseed=all_subseeds[first], n=batch)
            result = self._run_one(job, pipeline, part)
            with self._lock:
                was_skipped, interrupted = self.progress.skipped, self.progress.interrupted
            if was_skipped and not interrupted:
                skipped += batch
                continue
            for offset, path in enumerate(result.save(folder)):
                width, height = result.images[offset].size  # the hires fix makes them larger than asked
                image_ids.append(self.store.add_image(
                    job.id, len(seeds), path, prompt=part.prompt, negative_prompt=part.negative_prompt,
                    seed=result.seeds[offset], width=width, height=height, model=entry.title,
                    infotext=result.infotexts[offset]))
                seeds.append(result.seeds[offset])
                subseeds.append(result.subseeds[offset])
                infotexts.append(result.infotexts[offset])
            if interrupted:
                state = "interrupted"
                break
        with self._lock:
            timestamp = self.progress.job_timestamp
        width, height = request.resolved_size() if job.kind == "img2img" else (request.width, request.height)
        return state, {"seed": request.seed, "seeds": seeds, "subseeds": subseeds, "infotexts": infotexts,
                       "image_ids": image_ids, "width": width, "height": height, "model": entry.title, "model_name": entry.model_name,
                       "model_hash": pipeline.model_hash, "vae": pipeline.vae_name, "skipped_images": skipped,
                       "job_timestamp": timestamp}

    def _refiner(self, job: Job, pipeline) -> dict:
        """The SDXL refiner handoff a job asks for (`refiner_checkpoint`, checked against the catalog at submit)."""
        title = job.params.get("refiner_checkpoint")
        if title is None:
            return {}
        entry = self.catalog.find(title)
        if entry is None:
            raise JobFailed(f"refiner_checkpoint: model {title!r} is no longer available; see /sdapi/v1/sd-models")
        if not hasattr(pipeline, "refiner_pipeline"):
            raise JobFailed(f"refiner_checkpoint: {self.loaded.title} is not an SDXL base model; "
                            "refiners hand off from SDXL models only")
        return {"refiner": entry.path or embedded_model_path(), "refiner_switch_at": job.params["refiner_switch_at"]}

    def _request(self, job: Job, pipeline) -> GenerationRequest:
        """The library request of a job: txt2img at the model's native size unless given; img2img with its images."""
        params = job.params
        fields = {k: params[k] for k in GenerationRequest.__dataclass_fields__ if k in params}
        if job.kind == "txt2img":
            native = pipeline.native_size
            fields.update(width=fields.get("width") or native, height=fields.get("height") or native)
            return GenerationRequest(**fields).with_seed()
        with Image.open(Path(params["_init_image"])) as image:
            init = image.convert("RGB")
        mask = None
        if params.get("_mask"):
            with Image.open(Path(params["_mask"])) as image:
                mask = image.convert("L")
        return Img2ImgRequest(**fields, init_image=init, mask=mask, strength=params["denoising_strength"],
                              **params.get("img2img_options", {})).with_seed()

    def _run_one(self, job: Job, pipeline, request: GenerationRequest):
        if job.kind == "txt2img":
            return pipeline.generate(request, callback=self._on_step, **self._refiner(job, pipeline))
        return pipeline.img2img(request, callback=self._on_step)
