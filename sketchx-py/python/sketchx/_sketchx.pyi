"""The extension module (Rust, pyo3). Use the ``sketchx`` package, which wraps it."""

import os
from typing import Any, Dict, List, Optional, Tuple, final

__all__ = ["__version__", "Pipeline", "JobStatus", "defaults", "ranges", "names"]

__version__: str

def defaults() -> Dict[str, Any]: ...
def ranges() -> Dict[str, Tuple[float, float]]: ...
def names() -> Dict[str, List[str]]: ...
@final
class JobStatus:
    @property
    def job_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def progress(self) -> float: ...
    @property
    def images(self) -> List[str]: ...
    @property
    def message(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def step(self) -> int: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def queue_position(self) -> Optional[int]: ...
    @property
    def eta_secs(self) -> Optional[float]: ...
    @property
    def num_images(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def created_at(self) -> Optional[float]: ...
    @property
    def started_at(self) -> Optional[float]: ...
    @property
    def finished_at(self) -> Optional[float]: ...
    @property
    def done(self) -> bool: ...
    def to_dict(self) -> Dict[str, Any]: ...
    def to_json(self) -> str: ...

@final
class Pipeline:
    def __new__(
        cls,
        model: str,
        controlnet: str,
        device: str,
        dtype: Optional[str],
        output_dir: "str | os.PathLike[str]",
        queue_capacity: int,
        retention_secs: float,
        cleanup_interval_secs: Optional[float],
        vae_tiling: bool,
        redis_url: Optional[str] = None,
        drain_on_shutdown: Optional[bool] = None,
        loras: Optional[Any] = None,
        preview_vae: Optional[str] = None,
        embeddings: Optional[Any] = None,
        model_config: Optional[str] = None,
        original_config: Optional[str] = None,
        extract_ema: Optional[bool] = None,
        controlnet_config: Optional[str] = None,
        vae_model: Optional[str] = None,
    ) -> "Pipeline": ...
    @staticmethod
    def connect(url: str, prefix: Optional[str], queue_capacity: int) -> "Pipeline": ...
    def images(self, job_id: str) -> List[bytes]: ...
    def submit(
        self,
        sketch: "str | os.PathLike[str] | bytes | bytearray",
        raw: Optional[Tuple[int, int, int]],
        prompt: Optional[str],
        negative_prompt: Optional[str],
        temperature: float,
        guidance_scale: float,
        num_images: int,
        steps: int,
        seed: Optional[int],
        width: Optional[int],
        height: Optional[int],
        scheduler: str,
        preprocess: str,
        controlnet_scale: Optional[float],
        guess_mode: Optional[bool],
        control_guidance_start: float,
        control_guidance_end: float,
        timestep_spacing: Optional[str] = None,
        eta: Optional[float] = None,
        vae: Optional[str] = None,
        start_image: "str | os.PathLike[str] | bytes | bytearray | None" = None,
        start_raw: Optional[Tuple[int, int, int]] = None,
        strength: Optional[float] = None,
        canny_low_threshold: Optional[int] = None,
        canny_high_threshold: Optional[int] = None,
        clip_skip: Optional[int] = None,
    ) -> str: ...
    def poll(self, job_id: str) -> JobStatus: ...
    def wait(self, job_id: str, timeout: Optional[float] = None) -> JobStatus: ...
    def cancel(self, job_id: str) -> bool: ...
    def cleanup(self, max_age_secs: Optional[float] = None) -> int: ...
    def queued(self) -> int: ...
    @property
    def output_dir(self) -> "os.PathLike[str]": ...
    def close(self) -> None: ...
