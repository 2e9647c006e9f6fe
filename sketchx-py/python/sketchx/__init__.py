"""sketchx: turn a sketch into images with Stable Diffusion 1.5 + a scribble ControlNet, as asynchronous jobs
hosted inside this process (a Rust core on candle; no Redis, Celery or Docker).

>>> import sketchx
>>> with sketchx.Pipeline() as pipe:                                   # doctest: +SKIP
...     job_id = pipe.submit("car.png", "a red sports car", seed=42)
...     print(pipe.wait(job_id).images)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from types import MappingProxyType, TracebackType
from typing import Any, Iterable, List, Mapping, Optional, Tuple, Type, Union

from . import _sketchx
from ._errors import (
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
    SketchxError,
    UnknownJobError,
)
from ._sketchx import JobStatus

__version__: str = _sketchx.__version__

__all__ = [
    "__version__",
    "Pipeline",
    "connect",
    "JobStatus",
    "SketchxError",
    "InvalidRequestError",
    "UnknownJobError",
    "ModelLoadError",
    "QueueFullError",
    "DEFAULT_MODEL",
    "DEFAULT_CONTROLNET",
    "DEFAULTS",
    "RANGES",
    "NAMES",
]

# Every default below is the Rust core's (one source: `_sketchx.defaults()`); the stubs restate them and
# tests/test_defaults.py checks that they agree.
_DEFAULTS = _sketchx.defaults()

#: The default of every ``Pipeline(...)`` and ``Pipeline.submit(...)`` argument, by argument name.
DEFAULTS: Mapping[str, Any] = MappingProxyType(_DEFAULTS)
#: The allowed ``(min, max)`` of each numeric ``submit`` argument, as the core checks it.
RANGES: Mapping[str, Tuple[float, float]] = MappingProxyType(_sketchx.ranges())
#: The accepted names of ``scheduler``, ``preprocess``, ``device`` and ``dtype`` (any ASCII case; the default
#: first where there is one; ``cuda:N`` stands for ``cuda:0``, ``cuda:1``, ...).
NAMES: Mapping[str, Tuple[str, ...]] = MappingProxyType({k: tuple(v) for k, v in _sketchx.names().items()})
#: The default Stable Diffusion 1.5 repository.
DEFAULT_MODEL: str = _DEFAULTS["model"]
#: The default scribble ControlNet repository.
DEFAULT_CONTROLNET: str = _DEFAULTS["controlnet"]

# How long one slice of ``wait_async`` blocks an executor thread.
_ASYNC_SLICE_SECS = 0.2


def _sketch_args(sketch: Any) -> Tuple[Any, Optional[Tuple[int, int, int]]]:
    """The sketch as the extension takes it: a path or encoded bytes as they are, PIL images and numpy arrays as
    raw pixel bytes plus ``(height, width, channels)``. numpy and Pillow are only used if already imported by the
    caller (they are optional)."""
    if isinstance(sketch, (bytes, str)):
        return sketch, None
    if isinstance(sketch, (bytearray, memoryview)):
        return bytes(sketch), None
    if isinstance(sketch, os.PathLike):
        path = os.fspath(sketch)
        return (os.fsdecode(path) if isinstance(path, bytes) else path), None
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(sketch, pil.Image):
        has_alpha = "A" in sketch.getbands() or "transparency" in sketch.info
        mode = "RGBA" if has_alpha else "RGB"
        img = sketch if sketch.mode == mode else sketch.convert(mode)
        return img.tobytes(), (img.height, img.width, len(mode))
    np = sys.modules.get("numpy")
    if np is not None and isinstance(sketch, np.ndarray):
        if sketch.dtype != np.uint8:
            raise InvalidRequestError(
                f"invalid sketch: numpy array of dtype {sketch.dtype}; expected uint8", "sketch"
            )
        if sketch.ndim != 3 or sketch.shape[2] not in (3, 4):
            raise InvalidRequestError(
                f"invalid sketch: numpy array of shape {tuple(sketch.shape)}; expected (H, W, 3) or (H, W, 4)",
                "sketch",
            )
        height, width, channels = (int(n) for n in sketch.shape)
        return np.ascontiguousarray(sketch).tobytes(), (height, width, channels)
    raise InvalidRequestError(
        "invalid sketch: expected a path (str or os.PathLike), bytes, a PIL image or a numpy array of shape "
        f"(H, W, 3) or (H, W, 4) and dtype uint8, got {type(sketch).__name__}",
        "sketch",
    )


class Pipeline:
    """The sketch-to-image job pipeline: models loaded once, a worker thread running jobs one at a time, a job
    table, and a retention sweeper deleting old images. Thread-safe: share one between threads and requests.

    Every default is the Rust core's (``sketchx.DEFAULTS``). ``model`` / ``controlnet``: Hugging Face repo ids
    (``owner/name`` or ``owner/name@revision``, downloaded into the standard HF cache) or local diffusers-layout
    directories. ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``metal`` (GPU devices need a build with that
    feature). ``dtype``: ``"f32"``, ``"bf16"`` or ``"f16"``; ``None``: f32 on the CPU, f16 on GPUs (names in any
    ASCII case: ``sketchx.NAMES``). On the CPU, ``"bf16"`` runs the matrix products in bf16 with f32 accumulation
    (fast with AVX-512 BF16) and everything else in f32. ``cleanup_interval_secs=None``: no background sweeper.
    ``vae_tiling=True``: decode images in overlapping tiles, as diffusers after ``vae.enable_tiling()`` (the VAE
    decoder then needs the memory of one 512x512 tile for SD1.5 whatever the image size; pixels near the seams
    differ from an untiled decode; images that fit in one tile are unchanged).
    ``loras``: LoRA adapters fused into the UNet and text encoder at load, as ``(path, scale)`` pairs: a local
    ``.safetensors`` file or a Hub file ``owner/name[@revision]/file.safetensors``, and a finite scale within
    ±10 (``InvalidRequestError`` naming ``loras.scale`` otherwise; a bare path means scale 1). ``preview_vae``: a
    tiny VAE (TAESD: local directory or Hub id such as ``madebyollin/taesd``) for live previews and for
    ``submit(..., vae="tiny")``.
    ``embeddings``: textual inversion embeddings loaded in this order, as ``(path, token)`` pairs (a ``None``
    token binds the file's own) or ``"PATH[:TOKEN]"`` strings as the CLI's ``--embedding``: A1111 ``.pt`` / ``.safetensors`` and diffusers
    ``learned_embeds`` files (or a directory or Hub repo holding one, or a Hub file ``owner/name/file``), used
    through their token in the prompt and the negative prompt as diffusers' ``load_textual_inversion`` does
    (``ModelLoadError`` for a width other than the text encoder's, a token already in the vocabulary, an unknown
    layout).
    Single files: ``model`` may be a ``.safetensors`` / ``.ckpt`` / ``.pt`` checkpoint in the original (A1111)
    layout and ``controlnet`` a ``.safetensors`` / ``.pth`` in the original layout. ``model_config``: a diffusers
    folder or Hub id whose configs describe the single-file model (diffusers' ``config=``); ``original_config``: an
    original LDM ``.yaml`` instead; neither: SD1.5's configs and tokenizer built into sketchx (no Hub access
    needed). ``extract_ema=True``: the UNet's EMA weights (``model_ema.*``). ``controlnet_config``: a ControlNet
    folder or Hub id for a single-file ControlNet (default: derived from the UNet's config). ``vae_model``: a VAE
    replacing the model's (a single file such as ``vae-ft-mse-840000-ema-pruned.safetensors``, a folder or a Hub
    id).
    ``redis_url``: keep the jobs in that Redis (``redis://host:port``) instead of this process; the pipeline is
    then a worker of the shared queue (and a client of it), see ``connect`` and ``python -m sketchx.worker``.
    ``drain_on_shutdown=True``: ``close`` finishes the pending jobs instead of cancelling them (with Redis: the
    running job is finished instead of handed back to the queue; queued ones stay for other workers).
    Raises ``ModelLoadError`` if a model cannot load, ``InvalidRequestError`` for bad arguments.
    """

    def __init__(
        self,
        model: Union[str, "os.PathLike[str]"] = _DEFAULTS["model"],
        controlnet: Union[str, "os.PathLike[str]"] = _DEFAULTS["controlnet"],
        *,
        device: str = _DEFAULTS["device"],
        dtype: Optional[str] = _DEFAULTS["dtype"],
        output_dir: Union[str, "os.PathLike[str]"] = _DEFAULTS["output_dir"],
        queue_capacity: int = _DEFAULTS["queue_capacity"],
        retention_secs: float = _DEFAULTS["retention_secs"],
        cleanup_interval_secs: Optional[float] = _DEFAULTS["cleanup_interval_secs"],
        vae_tiling: bool = _DEFAULTS["vae_tiling"],
        redis_url: Optional[str] = _DEFAULTS["redis_url"],
        drain_on_shutdown: bool = _DEFAULTS["drain_on_shutdown"],
        loras: Iterable[Union[Tuple[Union[str, "os.PathLike[str]"], float], str, "os.PathLike[str]"]] = _DEFAULTS[
            "loras"
        ],
        preview_vae: Optional[Union[str, "os.PathLike[str]"]] = _DEFAULTS["preview_vae"],
        embeddings: Iterable[
            Union[Tuple[Union[str, "os.PathLike[str]"], Optional[str]], str, "os.PathLike[str]"]
        ] = _DEFAULTS["embeddings"],
        model_config: Optional[Union[str, "os.PathLike[str]"]] = _DEFAULTS["model_config"],
        original_config: Optional[Union[str, "os.PathLike[str]"]] = _DEFAULTS["original_config"],
        extract_ema: bool = _DEFAULTS["extract_ema"],
        controlnet_config: Optional[Union[str, "os.PathLike[str]"]] = _DEFAULTS["controlnet_config"],
        vae_model: Optional[Union[str, "os.PathLike[str]"]] = _DEFAULTS["vae_model"],
    ) -> None:
        self._native = _sketchx.Pipeline(
            os.fspath(model),
            os.fspath(controlnet),
            device,
            dtype,
            os.fspath(output_dir),
            queue_capacity,
            retention_secs,
            cleanup_interval_secs,
            vae_tiling,
            redis_url,
            drain_on_shutdown,
            loras,
            None if preview_vae is None else os.fspath(preview_vae),
            embeddings,
            None if model_config is None else os.fspath(model_config),
            None if original_config is None else os.fspath(original_config),
            extract_ema,
            None if controlnet_config is None else os.fspath(controlnet_config),
            None if vae_model is None else os.fspath(vae_model),
        )

    def submit(
        self,
        sketch: Any,
        prompt: Optional[str] = _DEFAULTS["prompt"],
        *,
        negative_prompt: Optional[str] = _DEFAULTS["negative_prompt"],
        temperature: float = _DEFAULTS["temperature"],
        guidance_scale: float = _DEFAULTS["guidance_scale"],
        num_images: int = _DEFAULTS["num_images"],
        steps: int = _DEFAULTS["steps"],
        seed: Optional[int] = _DEFAULTS["seed"],
        width: Optional[int] = _DEFAULTS["width"],
        height: Optional[int] = _DEFAULTS["height"],
        scheduler: str = _DEFAULTS["scheduler"],
        preprocess: str = _DEFAULTS["preprocess"],
        controlnet_scale: Optional[float] = _DEFAULTS["controlnet_scale"],
        guess_mode: Optional[bool] = _DEFAULTS["guess_mode"],
        control_guidance_start: float = _DEFAULTS["control_guidance_start"],
        control_guidance_end: float = _DEFAULTS["control_guidance_end"],
        timestep_spacing: Optional[str] = _DEFAULTS["timestep_spacing"],
        eta: float = _DEFAULTS["eta"],
        vae: str = _DEFAULTS["vae"],
        start_image: Any = _DEFAULTS["start_image"],
        strength: float = _DEFAULTS["strength"],
        canny_low_threshold: int = _DEFAULTS["canny_low_threshold"],
        canny_high_threshold: int = _DEFAULTS["canny_high_threshold"],
        clip_skip: int = _DEFAULTS["clip_skip"],
    ) -> str:
        """Validates the request, decodes the sketch and queues the job; returns its id at once.

        ``sketch``: a path (``str`` / ``os.PathLike``), encoded image ``bytes`` (PNG, JPEG, WebP, BMP, GIF), a
        ``PIL.Image.Image`` or a ``numpy.ndarray`` of shape (H, W, 3) or (H, W, 4) and dtype uint8.
        ``scheduler``, ``preprocess``, ``timestep_spacing`` (``None``: the model's) and ``vae`` (``"tiny"`` needs
        the pipeline's ``preview_vae``) take the names in ``sketchx.NAMES`` (any ASCII case); ``eta`` is the
        stochasticity of the ``ddim`` and ``tcd`` steps. ``start_image`` turns on img2img (diffusers'
        ``StableDiffusionControlNetImg2ImgPipeline``): ``"sketch"`` starts from the sketch's own colours, any other
        image (given as a sketch is) from that image; ``strength`` says how far it is noised (the last
        ``int(steps * strength)`` steps run). ``canny_low_threshold`` / ``canny_high_threshold`` are the
        thresholds of ``preprocess="canny"`` (OpenCV's Canny). ``clip_skip`` is diffusers' (the prompt is encoded
        by the hidden state that many layers before the last; A1111's "clip skip N" is N - 1; the negative prompt
        always uses the last layer, as in diffusers). The ranges are in ``sketchx.RANGES``. Raises
        ``InvalidRequestError`` (naming the field and the allowed range) for bad
        parameters or an undecodable sketch, ``QueueFullError`` when the queue is full.
        """
        data, raw = _sketch_args(sketch)
        start, start_raw = (None, None) if start_image is None else _sketch_args(start_image)
        return self._native.submit(
            data,
            raw,
            prompt,
            negative_prompt,
            temperature,
            guidance_scale,
            num_images,
            steps,
            seed,
            width,
            height,
            scheduler,
            preprocess,
            controlnet_scale,
            guess_mode,
            control_guidance_start,
            control_guidance_end,
            timestep_spacing,
            eta,
            vae,
            start,
            start_raw,
            strength,
            canny_low_threshold,
            canny_high_threshold,
            clip_skip,
        )

    def poll(self, job_id: str) -> JobStatus:
        """The job's current status. Raises ``UnknownJobError`` for an unknown id."""
        return self._native.poll(job_id)

    def wait(self, job_id: str, timeout: Optional[float] = None) -> JobStatus:
        """Blocks until the job is completed, failed or cancelled, and returns its status. Other Python threads
        run meanwhile and Ctrl-C interrupts it. Raises ``TimeoutError`` after ``timeout`` seconds (the job goes
        on), ``UnknownJobError`` for an unknown id."""
        return self._native.wait(job_id, timeout)

    async def wait_async(self, job_id: str, timeout: Optional[float] = None) -> JobStatus:
        """``wait`` for asyncio: waits in short slices on the default executor, so the event loop never blocks
        and cancelling the awaiting task stops waiting promptly."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_secs = _ASYNC_SLICE_SECS
            if deadline is not None:
                slice_secs = max(0.0, min(slice_secs, deadline - time.monotonic()))
            try:
                return await loop.run_in_executor(None, self._native.wait, job_id, slice_secs)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"timed out waiting for job {job_id}") from None

    def cancel(self, job_id: str) -> bool:
        """Cancels the job: a queued one at once, a running one at its next step (no files are left). ``False``
        if it had already finished. Raises ``UnknownJobError`` for an unknown id."""
        return self._native.cancel(job_id)

    def cleanup(self, max_age_secs: Optional[float] = None) -> int:
        """Deletes this pipeline's image files older than ``max_age_secs`` (default: ``retention_secs``) and
        forgets finished jobs whose files are gone; returns the number of files removed."""
        return self._native.cleanup(max_age_secs)

    def queued(self) -> int:
        """Number of jobs waiting in the queue."""
        return self._native.queued()

    def images(self, job_id: str) -> List[bytes]:
        """The PNG files of a completed job, in order (empty while it is not completed). With Redis they come from
        the store, so a client needs no shared disk."""
        return self._native.images(job_id)

    @property
    def output_dir(self) -> str:
        """The directory images are written to."""
        return os.fspath(self._native.output_dir)

    def close(self) -> None:
        """Stops accepting jobs, cancels pending ones and stops the worker. Idempotent. Statuses can still be
        polled; ``submit`` raises ``SketchxError``."""
        self._native.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"sketchx.Pipeline(output_dir={self.output_dir!r}, queued={self.queued()})"


def connect(url: str, *, prefix: str = "sketchx", queue_capacity: int = 64) -> Pipeline:
    """A client of the Redis job queue at ``url`` (``redis://host:port``): no model is loaded; ``submit``,
    ``poll``, ``wait``, ``cancel`` and ``images`` work as on a ``Pipeline``, and the queue's workers
    (``python -m sketchx.worker`` or the Rust ``worker`` example) run the jobs. ``prefix``: the deployment's key
    prefix. Raises ``SketchxError`` if the server cannot be reached."""
    pipe = Pipeline.__new__(Pipeline)
    pipe._native = _sketchx.Pipeline.connect(url, prefix, queue_capacity)
    return pipe
