#!/usr/bin/env python3
"""The original sketch-to-image REST service, rebuilt on the sketchx module: no Redis, Celery or Docker — the
pipeline runs jobs in-process.

    pip install ./sketchx-py fastapi uvicorn python-multipart
    uvicorn --app-dir examples/python server:app

    POST /api/generate          multipart: sketch (file), prompt, temperature, guidance_scale, num_images, steps,
                                seed (and, new, optional negative_prompt, width, height, scheduler,
                                timestep_spacing, eta, vae, preprocess, canny_low_threshold,
                                canny_high_threshold, start_image (an image file, or the text "sketch":
                                img2img), strength and clip_skip)
                                -> {"status": "queued", "job_id": "..."}
    GET  /api/status/{job_id}   {"job_id", "status", "progress", "images", "message", ...}; 404 for unknown ids
    GET  /generated/<file>      the images

Bad parameters or sketches answer 422 with the message naming the field; a full queue 503; a request body over
MAX_UPLOAD_BYTES 413, before the form parser stores it (at once when its Content-Length says so, else as soon as
the streamed body passes the limit); a body not received within BODY_READ_TIMEOUT_SECS 408. Every default, range
and name (in the form and its OpenAPI description at /openapi.json) is the Rust core's, from `sketchx.DEFAULTS`,
`sketchx.RANGES` and `sketchx.NAMES`; the checks are the core's. Environment: SKETCHX_MODEL, SKETCHX_CONTROLNET,
SKETCHX_DEVICE, SKETCHX_OUTPUT_DIR, SKETCHX_RETENTION_SECS (defaults: the module's), and SKETCHX_REDIS_URL: when
set, the app is a client of that Redis job queue (no model loaded here; `python -m sketchx.worker` processes run
the jobs) and serves the images from Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict, Optional, Union

from fastapi import FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import sketchx

# A request body (the whole multipart form, sketch included) larger than this is refused with 413 before it is
# read whole (the decoder has its own pixel limits too).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024


# How long a client may take to send its request body: one that sends slowly (or stops) gets 408 then, instead of
# holding its connection and buffers forever. Other clients never wait on it (each request is its own task).
BODY_READ_TIMEOUT_SECS = 30.0


class UploadLimit:
    """ASGI middleware refusing a request body over ``limit`` bytes with 413, or one not received within
    ``timeout`` seconds with 408. Starlette's form parser would otherwise spool a file field of any size to disk
    before the endpoint runs, and wait for a stalled client forever. The size refusal comes at once when the
    Content-Length header is over the limit; a body streamed without one is counted as it arrives, and once past
    the limit (or the deadline) the refusal is sent and the app sees the client disconnect (whatever it answers
    then is dropped)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = BODY_READ_TIMEOUT_SECS) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def refuse(self, send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body exceeds {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self.refuse(send, 413, too_large)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        received = 0
        refused = False
        started = False
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:  # only the disconnect is left to come: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                refused = True
                if not started:
                    await self.refuse(send, 408, f"the request body did not arrive within {self.timeout:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.limit:
                    refused = True
                    if not started:
                        await self.refuse(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise


_DEFAULTS = sketchx.DEFAULTS


def _form(field: str) -> Any:
    """A form field with the core's default, documented with the core's range or names (documented only: the
    checks are the core's, so that errors read the same everywhere)."""
    schema: Dict[str, Any] = {}
    if field in sketchx.RANGES:
        schema["minimum"], schema["maximum"] = sketchx.RANGES[field]
    if field in sketchx.NAMES:
        schema["enum"] = list(sketchx.NAMES[field])
    return Form(_DEFAULTS[field], json_schema_extra=schema or None)


async def _start_image(request: Request) -> Optional[Union[bytes, str]]:
    """img2img's ``start_image`` form field (a file part or a text part, so it is read from the form itself): an
    uploaded image's bytes, the text ``sketch`` (start from the sketch's colours), or ``None`` when absent or
    empty. Any other text is refused here: a client must never name a file on the server."""
    value = (await request.form()).get("start_image")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        if value.strip().lower() != "sketch":
            raise HTTPException(422, "invalid start_image: expected an image file or the text \"sketch\"")
        return value
    return await value.read()  # at most max_upload_bytes (UploadLimit)


def create_app(
    model: Optional[str] = None,
    controlnet: Optional[str] = None,
    *,
    device: Optional[str] = None,
    output_dir: Optional[str] = None,
    retention_secs: Optional[float] = None,
    redis_url: Optional[str] = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    body_timeout_secs: float = BODY_READ_TIMEOUT_SECS,
) -> FastAPI:
    """The app; the pipeline (models) loads at startup and shuts down with the app. With ``redis_url`` it
    connects to that job queue instead and loads no model. Request bodies over ``max_upload_bytes`` get 413,
    bodies not received within ``body_timeout_secs`` 408."""
    redis_url = redis_url or os.environ.get("SKETCHX_REDIS_URL") or None
    model = model or os.environ.get("SKETCHX_MODEL", _DEFAULTS["model"])
    controlnet = controlnet or os.environ.get("SKETCHX_CONTROLNET", _DEFAULTS["controlnet"])
    device = device or os.environ.get("SKETCHX_DEVICE", _DEFAULTS["device"])
    output_dir = output_dir or os.environ.get("SKETCHX_OUTPUT_DIR", _DEFAULTS["output_dir"])
    if retention_secs is None:
        retention_secs = float(os.environ.get("SKETCHX_RETENTION_SECS", _DEFAULTS["retention_secs"]))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = redis_url  # a local, so that the type checker narrows it
        if url:
            pipe = await run_in_threadpool(sketchx.connect, url)
        else:
            pipe = await run_in_threadpool(
                sketchx.Pipeline, model, controlnet, device=device, output_dir=output_dir,
                retention_secs=retention_secs,
            )
        app.state.pipe = pipe
        try:
            yield
        finally:
            await run_in_threadpool(pipe.close)

    app = FastAPI(title="sketchx", lifespan=lifespan)
    app.add_middleware(UploadLimit, limit=max_upload_bytes, timeout=body_timeout_secs)

    def pipeline(request: Request) -> sketchx.Pipeline:
        pipe: sketchx.Pipeline = request.app.state.pipe
        return pipe

    @app.post("/api/generate")
    async def generate(
        request: Request,
        sketch: UploadFile = File(...),
        prompt: Optional[str] = _form("prompt"),
        negative_prompt: Optional[str] = _form("negative_prompt"),
        temperature: float = _form("temperature"),
        guidance_scale: float = _form("guidance_scale"),
        num_images: int = _form("num_images"),
        steps: int = _form("steps"),
        seed: Optional[int] = _form("seed"),
        width: Optional[int] = _form("width"),
        height: Optional[int] = _form("height"),
        scheduler: str = _form("scheduler"),
        timestep_spacing: Optional[str] = _form("timestep_spacing"),
        eta: float = _form("eta"),
        vae: str = _form("vae"),
        preprocess: str = _form("preprocess"),
        canny_low_threshold: int = _form("canny_low_threshold"),
        canny_high_threshold: int = _form("canny_high_threshold"),
        strength: float = _form("strength"),
        clip_skip: int = _form("clip_skip"),
    ) -> Dict[str, Any]:
        data = await sketch.read()  # at most max_upload_bytes (UploadLimit)
        start_image = await _start_image(request)
        try:
            job_id = await run_in_threadpool(
                pipeline(request).submit,
                data,
                prompt,
                negative_prompt=negative_prompt,
                temperature=temperature,
                guidance_scale=guidance_scale,
                num_images=num_images,
                steps=steps,
                seed=seed,
                width=width,
                height=height,
                scheduler=scheduler,
                timestep_spacing=timestep_spacing or None,
                eta=eta,
                vae=vae,
                preprocess=preprocess,
                canny_low_threshold=canny_low_threshold,
                canny_high_threshold=canny_high_threshold,
                start_image=start_image,
                strength=strength,
                clip_skip=clip_skip,
            )
        except sketchx.InvalidRequestError as e:
            raise HTTPException(422, str(e)) from None
        except sketchx.QueueFullError as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "10"}) from None
        return {"status": "queued", "job_id": job_id}

    @app.get("/api/status/{job_id}")
    def status(request: Request, job_id: str) -> Dict[str, Any]:
        try:
            st = pipeline(request).poll(job_id)
        except sketchx.UnknownJobError:
            raise HTTPException(404, "Job not found") from None
        body = st.to_dict()
        body["images"] = [f"/generated/{os.path.basename(p)}" for p in st.images]
        return body

    if redis_url:

        @app.get("/generated/{name}")
        def stored_image(request: Request, name: str) -> Response:
            # "<job_id>_<i>.png": the worker stored the PNG bytes in Redis.
            stem, _, index = name.removesuffix(".png").rpartition("_")
            try:
                pngs = pipeline(request).images(stem)
                return Response(pngs[int(index)], media_type="image/png")
            except (sketchx.UnknownJobError, ValueError, IndexError):
                raise HTTPException(404, "Image not found") from None

    else:
        os.makedirs(output_dir, exist_ok=True)  # only the in-process pipeline writes (and serves) files
        app.mount("/generated", StaticFiles(directory=output_dir), name="generated")
    return app


app = create_app()
