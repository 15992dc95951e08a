"""Build llama.cpp's own server (`llama-server`) from the llama.cpp sources shipped inside the
llama-cpp-python source package, so the peer runs the very llama.cpp version kvfork runs.

    python bench/build_llama_server.py            # -> bench/peers/llama-server (prints the path)

The source package is fetched with `pip download --no-binary :all:` (PyPI, nothing else on the
network); nothing from it is committed (bench/peers/ is git-ignored). CPU build for this CPU's
instruction sets without AMX (its kernels crash on llama.cpp's default repacked weights, llama.cpp #20824:
see kvfork/engine/buildcheck.py), no web UI, no HTTPS. Takes ~6 minutes on 2 cores; a second run reuses the binary.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from kvfork.engine.buildcheck import cmake_args, cpu_flags

PEERS = Path(__file__).resolve().parent / "peers"


def llama_cpp_python_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def fetch_sources(version: str, into: Path) -> Path:
    """Download and unpack llama-cpp-python==version's sdist; return its vendored llama.cpp folder."""
    src = into / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                    f"llama-cpp-python=={version}", "-d", str(into)], check=True)
    (archive,) = into.glob(f"llama_cpp_python-{version}.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return src


def build(src: Path, build_dir: Path, jobs: int) -> Path:
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
             *cmake_args(cpu_flags()).split()]  # NOTE: this CPU's sets without AMX, as kvfork's own build
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *generator, *flags], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], check=True)
    (binary,) = build_dir.glob("bin/llama-server")
    return binary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default=None, help="llama-cpp-python version (default: the installed one)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    version = args.version or llama_cpp_python_version()
    target = PEERS / "llama-server"
    stamp = PEERS / "llama-server.version"
    if target.exists() and stamp.exists() and stamp.read_text().strip() == version:
        print(target)
        return
    src = fetch_sources(version, PEERS / "src")
    binary = build(src, PEERS / "build", args.jobs)
    tmp = target.with_suffix(".tmp")
    shutil.copy2(binary, tmp)
    os.replace(tmp, target)
    stamp.write_text(version + "\n")
    print(target)


if __name__ == "__main__":
    main()
