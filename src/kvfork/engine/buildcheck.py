"""Does the installed llama.cpp build run on this CPU? Compare what it was compiled for with what the CPU has.

llama-cpp-python builds llama.cpp from source with GGML_NATIVE=ON: the library uses every instruction set
of the machine that built it. A Python environment (or pip's wheel cache) carried to another machine then
dies with SIGILL in whichever kernel first uses a missing instruction, often deep into a run. This module
names the missing sets up front, and `kvfork doctor --fix` rebuilds llama-cpp-python for any x86-64-v3 CPU.
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

__all__ = ["BuildReport", "cpu_flags", "missing_features", "probe", "rebuild", "PORTABLE_CMAKE_ARGS"]

# NOTE: the names llama_print_system_info() gives compile-time features, against /proc/cpuinfo's flags
_FLAG_OF = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}
# NOTE: no -march=native; ggml's defaults then are AVX, AVX2, FMA, F16C and BMI2 (x86-64-v3)
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF"


@dataclass(frozen=True)
class BuildReport:
    """What a fresh interpreter saw: the build's features, the ones this CPU lacks, or the signal it died of."""

    system_info: str
    missing: tuple[str, ...]
    crashed: str | None = None

    @property
    def ok(self) -> bool:
        return self.crashed is None and not self.missing


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


def missing_features(system_info: str, flags: frozenset[str] | None) -> list[str]:
    """Features the build was compiled with ("AVX512_BF16 = 1" in the system info) that the CPU lacks."""
    if flags is None:
        return []
    compiled = []
    for part in system_info.replace("\n", "|").split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if value.strip() == "1" and name in _FLAG_OF:
            compiled.append(name)
    return [name for name in compiled if _FLAG_OF[name] not in flags]


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
    return BuildReport(system_info=info, missing=tuple(missing_features(info, cpu_flags())))


def rebuild() -> int:
    """Rebuild the installed llama-cpp-python version from source for any x86-64-v3 CPU (~6 min on 2 cores).

    NOTE: --no-cache-dir and --force-reinstall: pip would otherwise reuse the very wheel that does not run here
    (its cache key is the source file, not the build flags)."""
    version = metadata.version("llama-cpp-python")
    env = dict(os.environ, CMAKE_ARGS=f"{os.environ.get('CMAKE_ARGS', '')} {PORTABLE_CMAKE_ARGS}".strip(),
               FORCE_CMAKE="1")
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--force-reinstall", "--no-deps",
           f"llama-cpp-python=={version}"]
    return subprocess.run(cmd, env=env).returncode
