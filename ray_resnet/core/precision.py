"""Training precision (pure PyTorch; no Ray): where bf16 autocast pays, and the autocast itself.
"""

from __future__ import annotations

import contextlib

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16, or a CPU with AMX
    (Intel Sapphire Rapids and later). Without them bf16 is emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # older torch cannot tell: fp32
    return device.type == "cpu" and bool(capabilities.get("amx_bf16", False))


def training_precision(device: torch.device, amp: str) -> str:
    """perf.amp resolved for `device`: "auto" is bf16 where the hardware has native bf16 matrix units, else fp32."""
    return ("bf16" if native_bf16(device) else "fp32") if amp == "auto" else amp


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16" (or "auto" on hardware with native bf16); fp32 otherwise."""
    if training_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is in a lower precision (bf16 logits under autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
