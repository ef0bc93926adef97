"""The host's instruction sets, and what they mean for int8 arithmetic.

A built-in profile describes its target, not the host; `target_vs_host` says when the host
lacks instruction sets the target computes int8 exactly with, so what runs here differs.
"""

from __future__ import annotations

import os

import torch

from fxcompress.hardware_profiles import Profile

#: Instruction-set flags that decide int8 arithmetic (as /proc/cpuinfo spells them).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
#: Flags with which a u8 x s8 dot product accumulates in 32 bits (VPDPBUSD, AMX). Without them
#: x86 int8 kernels (oneDNN, ONNX Runtime's MLAS) use VPMADDUBSW, which adds pairs of u8 x s8
#: products into 16 bits and saturates above 32767.
EXACT_U8S8 = ("avx512_vnni", "avx_vnni", "amx_int8")


def host_isa() -> tuple[str, ...]:
    """The int8-relevant instruction sets of this CPU (`ISA_FLAGS`, as /proc/cpuinfo names
    them), or what `FXCOMPRESS_HOST_ISA` (comma-separated) says, for testing a host one does
    not have. Without /proc/cpuinfo, torch's own capability probe."""
    forced = os.environ.get("FXCOMPRESS_HOST_ISA")
    if forced is not None:
        return tuple(f for f in (s.strip().lower() for s in forced.split(",")) if f)
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        cap = torch.backends.cpu.get_cpu_capability().lower()
        flags = {"avx2", "fma"} if cap.startswith("avx") else set()
        if cap.startswith("avx512"):
            flags |= {"avx512f", "avx512bw", "avx512_vnni"}
    return tuple(f for f in ISA_FLAGS if f in flags)


def int8_weight_bits(isa: tuple[str, ...]) -> int:
    """Bits of int8 weight range that x86 u8 x s8 kernels compute exactly on a CPU with `isa`:
    8 with a 32-bit-accumulating dot product, else 7 (|q| <= 63 keeps 2 x 255 x 63 < 32767)."""
    return 8 if any(f in isa for f in EXACT_U8S8) else 7


def target_vs_host(profile: Profile) -> str | None:
    """A note when the profile's target computes int8 exactly with instruction sets this host
    lacks: the plan is the target's, and what differs when it runs here."""
    if profile.measure or profile.int8_weight_bits <= 7:
        return None
    exact_on_target = [f for f in EXACT_U8S8 if f in profile.isa]
    host = host_isa()
    if not exact_on_target or int8_weight_bits(host) == 8:
        return None
    return (f"the plan is for {profile.name}'s target ({', '.join(profile.isa)}); this host "
            f"({', '.join(host) or 'no AVX2'}) has no {' / '.join(exact_on_target)}, so int8 "
            "GEMMs run here under Inductor saturate (u8 x s8 pairs summed in 16 bits) and "
            "timings here are not the target's. The .onnx that fxcompress.export writes is "
            "correct on any x86 CPU; to run the .pt2 under Inductor on this host, compile with "
            "profile='x86-avx2' (7-bit weights) or 'x86-host' (this host, measured)")
