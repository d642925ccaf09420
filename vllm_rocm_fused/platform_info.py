"""Facts about the machine, learned from torch alone (no vLLM import).

The FP8 format follows the hardware: AMD gfx942 (MI300) uses e4m3fnuz (max 240),
everything else we target (gfx950/MI355, Hopper, CPU) uses e4m3fn (max 448).
"""

from __future__ import annotations

import functools
import platform

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def is_rocm() -> bool:
    return torch.version.hip is not None


def is_cuda() -> bool:
    return torch.version.cuda is not None and torch.version.hip is None


@functools.lru_cache(maxsize=None)
def gpu_arch(device_index: int = 0) -> str | None:
    """ "gfx942", "gfx950", "sm90", ... or None without a visible GPU."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device_index)
    if is_rocm():
        return getattr(props, "gcnArchName", "gfx?").split(":")[0]
    return f"sm{props.major}{props.minor}"


def default_fp8_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The FP8 type the GEMMs on ``device`` consume."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and is_rocm():
        if (gpu_arch(device.index or 0) or "").startswith("gfx942"):
            return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def describe() -> dict[str, object]:
    """Platform summary for doctor."""
    if is_rocm():
        kind = "rocm"
    elif is_cuda():
        kind = "cuda"
    else:
        kind = "cpu"
    info: dict[str, object] = {
        "torch_build": kind,
        "gpu_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_arch": gpu_arch() if torch.cuda.is_available() else None,
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    info["default_fp8_dtype"] = str(default_fp8_dtype("cuda" if info["gpu_available"] else "cpu"))
    return info
