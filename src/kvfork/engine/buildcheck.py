"""Does the installed llama.cpp build run on this CPU? Compare what it was compiled for with what the CPU has.

llama-cpp-python builds llama.cpp from source with GGML_NATIVE=ON: the library uses every instruction set
of the machine that built it. A Python environment (or pip's wheel cache) carried to another machine then
dies with SIGILL in whichever kernel first uses a missing instruction, often deep into a run. This module
names the missing sets up front, and `kvfork doctor --fix` rebuilds llama-cpp-python for this CPU's sets.

A native build on a CPU with AMX also compiles in llama.cpp's AMX weight buffer, whose matmul segfaults at the
first decode (llama.cpp #20824, open upstream). It is used wherever weights are repacked (`repack=True`, and
llama.cpp's own default): measured here (llama-cpp-python 0.3.36, 2026-12-05) with both catalog models. Such a
build is reported as crashing, and the rebuild leaves AMX out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = ["BuildReport", "cpu_flags", "missing_features", "crashing_features", "cmake_args", "build_env", "probe",
           "rebuild", "PORTABLE_CMAKE_ARGS"]

# NOTE: the names llama_print_system_info() gives compile-time features, against /proc/cpuinfo's flags
_FLAG_OF = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}
# NOTE: no -march=native; ggml's defaults then are AVX, AVX2, FMA, F16C and BMI2 (x86-64-v3)
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF"
# NOTE: ggml's CMake switch for each set it compiles in without -march=native, with the cpuinfo flags it needs
# (GGML_AVX512 passes -mavx512f/cd/vl/dq/bw). The AMX switches stay off: see the module's docstring.
_CMAKE_OPTION = {
    "GGML_SSE42": ("sse4_2",), "GGML_AVX": ("avx",), "GGML_AVX2": ("avx2",), "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",), "GGML_BMI2": ("bmi2",), "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",), "GGML_AVX512_VNNI": ("avx512_vnni",), "GGML_AVX512_BF16": ("avx512_bf16",),
}
# NOTE: compiled-in features whose llama.cpp kernels crash on a CPU that has them (llama.cpp #20824)
_CRASHING = ("AMX_INT8",)


@dataclass(frozen=True)
class BuildReport:
    """What a fresh interpreter saw: the build's features, the ones this CPU lacks, the ones known to crash here,
    or the signal it died of."""

    system_info: str
    missing: tuple[str, ...]
    crashed: str | None = None
    crashing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.crashed is None and not self.missing and not self.crashing


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's instruction-set flags, None where the kernel does not list them (not Linux on x86)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def _compiled(system_info: str) -> list[str]:
    """The features a system info line says are compiled in ("AVX512_BF16 = 1"), as far as cpuinfo names them."""
    compiled = []
    for part in system_info.replace("\n", "|").split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if value.strip() == "1" and name in _FLAG_OF:
            compiled.append(name)
    return compiled


def missing_features(system_info: str, flags: frozenset[str] | None) -> list[str]:
    """Features the build was compiled with ("AVX512_BF16 = 1" in the system info) that the CPU lacks."""
    if flags is None:
        return []
    return [name for name in _compiled(system_info) if _FLAG_OF[name] not in flags]


def crashing_features(system_info: str, flags: frozenset[str] | None) -> list[str]:
    """Features the build was compiled with whose llama.cpp kernels crash on this CPU, which has them (AMX_INT8:
    the AMX weight buffer's matmul, used whenever weights are repacked). A CPU without them has them as missing."""
    if flags is None:
        return []
    return [name for name in _compiled(system_info) if name in _CRASHING and _FLAG_OF[name] in flags]


def cmake_args(flags: frozenset[str] | None) -> str:
    """CMAKE_ARGS for a build that runs on this CPU: every instruction set ggml can target that it has, AMX left
    out; x86-64-v3 where the flags are unknown."""
    if flags is None:
        return PORTABLE_CMAKE_ARGS
    switches = [f"-D{option}={'ON' if all(f in flags for f in needs) else 'OFF'}"
                for option, needs in _CMAKE_OPTION.items()]
    return " ".join([PORTABLE_CMAKE_ARGS, *switches])


def build_env(args: str) -> dict[str, str]:
    """This process's environment for a pip build of llama-cpp-python: the user's CMAKE_ARGS, then `args`;
    every core compiles unless the user set CMAKE_BUILD_PARALLEL_LEVEL."""
    env = dict(os.environ, CMAKE_ARGS=f"{os.environ.get('CMAKE_ARGS', '')} {args}".strip(), FORCE_CMAKE="1")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    return env


def probe(timeout: float = 120.0) -> BuildReport:
    """Load llama.cpp in a fresh interpreter (a build for another CPU may kill it) and compare."""
    code = (
        "import json, llama_cpp; llama_cpp.llama_backend_init(); "
        "print(json.dumps(llama_cpp.llama_print_system_info().decode()))"
    )
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return BuildReport(system_info="", missing=(), crashed=f"no answer within {timeout:.0f} s")
    if run.returncode != 0:
        why = (signal.Signals(-run.returncode).name if run.returncode < 0
               else f"exit {run.returncode}: {run.stderr.strip()[-300:]}")
        return BuildReport(system_info="", missing=(), crashed=why)
    info = json.loads(run.stdout.strip().splitlines()[-1])
    flags = cpu_flags()
    return BuildReport(system_info=info, missing=tuple(missing_features(info, flags)),
                       crashing=tuple(crashing_features(info, flags)))


def rebuild() -> int:
    """Rebuild the installed llama-cpp-python version from source for this CPU's instruction sets, AMX left out
    (6-10 min on 2 cores: 9 min measured on 2026-12-05).

    NOTE: --no-cache-dir and --force-reinstall: pip would otherwise reuse the very wheel that does not run here
    (its cache key is the source file, not the build flags)."""
    version = metadata.version("llama-cpp-python")
    env = build_env(cmake_args(cpu_flags()))
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--force-reinstall", "--no-deps",
           f"llama-cpp-python=={version}"]
    return subprocess.run(cmd, env=env).returncode
