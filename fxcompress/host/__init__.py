"""The host: its instruction sets, its free cores, micro-benchmarks of its speed, and timing
as the project reports it.

A built-in profile describes a *target* (`x86-server` is an AVX-512 VNNI server, whatever
machine compiles for it), so the same inputs give the same plan on any host. Only a profile
marked `measure` (the built-in `x86-host`) describes "this machine": `calibrated` reads its
instruction sets from the host (`host_isa`, in `fxcompress.host.isa`), and with them the int8
weight range its kernels compute exactly (`int8_weight_bits`), and measures its throughput
(`fxcompress.host.measure`). `compile_threads` picks how many threads a compile uses
(`fxcompress.host.cores`). `interleaved` times an original and a compressed model in one
process, alternately, and reports medians and their ratio (`fxcompress.host.timing`).
"""

from fxcompress.host.cores import compile_threads, threads
from fxcompress.host.isa import (
    EXACT_U8S8,
    ISA_FLAGS,
    host_isa,
    int8_weight_bits,
    target_vs_host,
)
from fxcompress.host.measure import calibrated, host_numbers, measure_host
from fxcompress.host.timing import Timing, interleaved

__all__ = [
    "EXACT_U8S8",
    "ISA_FLAGS",
    "Timing",
    "calibrated",
    "compile_threads",
    "host_isa",
    "host_numbers",
    "int8_weight_bits",
    "interleaved",
    "measure_host",
    "target_vs_host",
    "threads",
]
