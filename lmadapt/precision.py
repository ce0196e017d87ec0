"""Compute precision: `auto`, `fp32` or `bf16` (bf16 autocast; weights and optimizer state stay
float32, and so do the fused linear + cross-entropy and every loss).

`auto` picks bf16 where it is fast: on CUDA with bf16 support, and on a CPU that has native bf16
matmul instructions (AVX512-BF16 or AMX) that oneDNN uses. Elsewhere bf16 is emulated and far
slower than float32 (measured on an AVX2-only AMD EPYC: a 576 x 1536 Linear ran at 16 GFLOP/s
under bf16 autocast against 72 in float32), so `auto` stays float32 there. `bf16` forces it anyway.

LMADAPT_CPU_BF16=0 (or 1) overrides the CPU's answer, for `auto` in this process and the ones it
starts: float32 figures on a bf16 CPU (the test suite sets 0, so that its hand-computed values do
not depend on the machine), or bf16 on a CPU whose flags are not visible.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

PRECISIONS = ("auto", "fp32", "bf16")


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: nothing cheap to read; treated as no bf16
        pass
    return set()


ENV = "LMADAPT_CPU_BF16"


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX) and oneDNN can use it, or
    what LMADAPT_CPU_BF16 (0 / 1) says."""
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{ENV}={forced!r}: set it to 0 (float32) or 1 (bf16), or unset it")
        return forced == "1"
    if not cpu_flags() & set(BF16_FLAGS):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def resolve(precision: str | None, device: torch.device | str | None = None) -> str:
    """'auto' | 'fp32' | 'bf16' (None = auto) -> the precision that runs: 'fp32' or 'bf16'."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if dev.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str):
    """The context every forward pass runs in: bf16 autocast, or nothing for fp32."""
    dev = torch.device(device)
    if resolve(precision, dev) == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def float32_region(device_type: str):
    """Autocast off: for the parts that stay float32 under bf16 (losses, the fused LM loss)."""
    return torch.autocast(device_type, enabled=False)
