"""Norm weights in the form aiter's kernels read them, made once per layer weight.

aiter's fused kernels read ``w`` in the input dtype and, on the per-group path,
have no Gemma mode, so a Gemma/Qwen3.5 norm (``x * (1 + w)``) passes ``1 + w``
rounded to the input dtype. That rounding is a real (small) change against the
spec's float32 ``w + 1``: at most half a bfloat16 ulp of ``1 + w``, so the
normed value may sit one extra rounding away from the reference. It is logged
once and shown by doctor. Where aiter has a Gemma flag (``gemma_norm``, the
AR+RMSNorm kernels from v0.1.17) the raw ``w`` is passed and the kernel adds 1
in float32.

Each derived tensor is keyed on the source weight's storage and refreshed in
place (same address, so captured graphs read the new values) when the weight
changes: by version counter when the caller passes the parameter itself, or by
``refresh(weight)`` from the layer's weight loader (vLLM passes ``param.data``,
whose version counter is a fresh one on every access).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_ENTRIES = 1024  # a 60-layer Qwen3.5 has ~121 norm sites per rank


@dataclass
class _Entry:
    source: torch.Tensor  # keeps the storage alive, so its address cannot be reused
    version: int | None
    derived: torch.Tensor


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class KernelWeights:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    @staticmethod
    def needs_copy(weight: torch.Tensor, offset: float, dtype: torch.dtype) -> bool:
        return offset != 0.0 or weight.dtype != dtype or not weight.is_contiguous()

    def get(self, weight: torch.Tensor, offset: float, dtype: torch.dtype) -> torch.Tensor:
        """``round_to_dtype(float32(weight) + offset)``, contiguous; ``weight``
        itself when that is the identity."""
        if not self.needs_copy(weight, offset, dtype):
            return weight
        key = (weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape), float(offset), dtype)
        version = _version(weight)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                if entry.version == version:
                    return entry.derived
                self._fill(entry.derived, weight, offset)
                entry.version = version
                return entry.derived
            with torch.inference_mode(False), torch.no_grad():
                derived = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            self._fill(derived, weight, offset)
            self._entries[key] = _Entry(weight, version, derived)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
            return derived

    def refresh(self, weight: torch.Tensor) -> int:
        """Recompute, in place, every derived copy of ``weight``'s storage (after a
        weight load). Returns how many were refreshed."""
        ptr, device = weight.data_ptr(), weight.device
        n = 0
        with self._lock:
            for key, entry in self._entries.items():
                if key[0] == ptr and key[1] == device:
                    self._fill(entry.derived, entry.source, key[4])
                    entry.version = _version(entry.source)
                    n += 1
        return n

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _fill(out: torch.Tensor, weight: torch.Tensor, offset: float) -> None:
        with torch.no_grad():
            out.copy_(weight.to(torch.float32) + offset if offset else weight)
