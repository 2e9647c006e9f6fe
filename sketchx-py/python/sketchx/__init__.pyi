"""sketchx: turn a sketch into images with Stable Diffusion 1.5 + a scribble ControlNet, as asynchronous jobs
hosted inside this process."""

import os
from types import TracebackType
from typing import Any, Iterable, List, Mapping, Optional, Tuple, Type, Union

from ._errors import InvalidRequestError as InvalidRequestError
from ._errors import ModelLoadError as ModelLoadError
from ._errors import QueueFullError as QueueFullError
from ._errors import SketchxError as SketchxError
from ._errors import UnknownJobError as UnknownJobError
from ._sketchx import JobStatus as JobStatus

__version__: str
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

DEFAULTS: Mapping[str, Any]
RANGES: Mapping[str, Tuple[float, float]]
NAMES: Mapping[str, Tuple[str, ...]]
DEFAULT_MODEL: str
DEFAULT_CONTROLNET: str

# The defaults below restate the Rust core's (`sketchx.DEFAULTS`); tests/test_defaults.py checks each one.

# A sketch: a path (str or os.PathLike), encoded image bytes (PNG, JPEG, WebP, BMP, GIF), a PIL.Image.Image, or a
# numpy.ndarray of shape (H, W, 3) or (H, W, 4) and dtype uint8. numpy and Pillow are optional dependencies, so
# their types are not named here.
_SketchLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]

class Pipeline:
    def __init__(
        self,
        model: Union[str, "os.PathLike[str]"] = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        controlnet: Union[str, "os.PathLike[str]"] = "lllyasviel/sd-controlnet-scribble",
        *,
        device: str = "cpu",
        dtype: Optional[str] = None,
        output_dir: Union[str, "os.PathLike[str]"] = "generated",
        queue_capacity: int = 64,
        retention_secs: float = 3600.0,
        cleanup_interval_secs: Optional[float] = 3600.0,
        vae_tiling: bool = False,
        redis_url: Optional[str] = None,
        drain_on_shutdown: bool = False,
        loras: Iterable[Union[Tuple[Union[str, "os.PathLike[str]"], float], str, "os.PathLike[str]"]] = (),
        preview_vae: Optional[Union[str, "os.PathLike[str]"]] = None,
        embeddings: Iterable[
            Union[Tuple[Union[str, "os.PathLike[str]"], Optional[str]], str, "os.PathLike[str]"]
        ] = (),
        model_config: Optional[Union[str, "os.PathLike[str]"]] = None,
        original_config: Optional[Union[str, "os.PathLike[str]"]] = None,
        extract_ema: bool = False,
        controlnet_config: Optional[Union[str, "os.PathLike[str]"]] = None,
        vae_model: Optional[Union[str, "os.PathLike[str]"]] = None,
    ) -> None: ...
    def submit(
        self,
        sketch: _SketchLike,
        prompt: Optional[str] = None,
        *,
        negative_prompt: Optional[str] = None,
        temperature: float = 0.65,
        guidance_scale: float = 7.5,
        num_images: int = 1,
        steps: int = 30,
        seed: Optional[int] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        scheduler: str = "euler_a",
        preprocess: str = "scribble",
        controlnet_scale: Optional[float] = None,
        guess_mode: Optional[bool] = None,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        timestep_spacing: Optional[str] = None,
        eta: float = 0.0,
        vae: str = "full",
        start_image: Optional[_SketchLike] = None,
        strength: float = 0.8,
        canny_low_threshold: int = 100,
        canny_high_threshold: int = 200,
        clip_skip: int = 0,
    ) -> str: ...
    def poll(self, job_id: str) -> JobStatus: ...
    def wait(self, job_id: str, timeout: Optional[float] = None) -> JobStatus: ...
    async def wait_async(self, job_id: str, timeout: Optional[float] = None) -> JobStatus: ...
    def cancel(self, job_id: str) -> bool: ...
    def cleanup(self, max_age_secs: Optional[float] = None) -> int: ...
    def queued(self) -> int: ...
    def images(self, job_id: str) -> List[bytes]: ...
    @property
    def output_dir(self) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Pipeline": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...

def connect(url: str, *, prefix: str = "sketchx", queue_capacity: int = 64) -> Pipeline: ...
