"""`kvfork build`: llama-cpp-python from its pinned source package with kvfork's batch-invariant CPU kernels
(src/kvfork/engine/ggml-batch-invariant.patch), built for this CPU and checked bit for bit before anything uses it.

Steps: pip downloads the sdist of the pinned version and its sha256 is checked; the patch is applied to the
unpacked tree (dry run first); pip builds and installs that tree (into --target DIR, or this environment);
a fresh interpreter then loads the new build, which must list BATCH_INVARIANT = 1, and runs the invariance
self-test (kvfork.engine.invariance) on gemma3-270m when it is pulled. About 6 minutes on 2 idle cores (11 measured
under load).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from kvfork.engine.buildcheck import PORTABLE_CMAKE_ARGS, build_env, cmake_args, cpu_flags
from kvfork.errors import EngineError

__all__ = ["SDIST_SHA256", "SDIST_VERSION", "add_build_command", "apply_patch", "build", "fetch_sdist",
           "patch_file", "pythonpath_first", "self_test"]

# NOTE: the patch is written against the llama.cpp this exact file vendors (0c1e570); pyproject pins the version
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PATCH_NAME = "ggml-batch-invariant.patch"


def patch_file() -> Path:
    """The patch: $KVFORK_PATCH, else the one next to this module (packaged with kvfork)."""
    here = Path(__file__).resolve()
    candidates = [Path(p) for p in [os.environ.get("KVFORK_PATCH")] if p]
    candidates += [here.parent / PATCH_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise EngineError(f"{PATCH_NAME} not found (looked in {', '.join(map(str, candidates))}); set KVFORK_PATCH")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(folder: Path) -> Path:
    """pip download the pinned llama-cpp-python sdist into `folder` and check its sha256."""
    name = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    path = folder / name
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-cache-dir",
               f"llama-cpp-python=={SDIST_VERSION}", "-d", str(folder)]
        if subprocess.run(cmd).returncode != 0 or not path.exists():
            raise EngineError(f"pip could not download llama-cpp-python=={SDIST_VERSION}'s source package")
    got = sha256(path)
    if got != SDIST_SHA256:
        raise EngineError(f"{path} has sha256 {got}, not {SDIST_SHA256}: not the source the patch was written for")
    return path


def apply_patch(sdist: Path, folder: Path, patch: Path) -> Path:
    """Unpack `sdist` into `folder` and apply `patch` to it (checked with a dry run first); return the tree."""
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        if any(n.startswith("/") or ".." in Path(n).parts for n in names):
            raise EngineError(f"{sdist} holds paths outside its folder")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:  # pragma: no cover - Python without extraction filters; the names were checked above
            tar.extractall(folder)
    tree = folder / names[0].split("/")[0]
    tool = shutil.which("patch")
    if tool is None:
        raise EngineError("`patch` is not installed (apt-get install patch)")
    for extra in (["--dry-run"], []):
        run = subprocess.run([tool, "-p1", "--forward", "--batch", *extra, "-i", str(patch)], cwd=tree,
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise EngineError(f"{patch.name} does not apply to {sdist.name}: {run.stdout[-500:]}{run.stderr[-300:]}")
    return tree


def build(tree: Path, *, target: Path | None, portable: bool) -> None:
    """pip build and install the patched tree: into `target` (a folder for PYTHONPATH) or this environment."""
    # NOTE: not -march=native: that compiles in AMX kernels that crash on repacked weights (buildcheck)
    env = build_env(PORTABLE_CMAKE_ARGS if portable else cmake_args(cpu_flags()))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--force-reinstall"]
    if target is not None:
        cmd += ["--upgrade", "--target", str(target)]
    if subprocess.run([*cmd, str(tree)], env=env).returncode != 0:
        raise EngineError("pip could not build the patched llama-cpp-python (its output above says why)")


def pythonpath_first(env: dict[str, str], folder: str | Path) -> dict[str, str]:
    """`env` with `folder` (a `kvfork build --target` install) first on PYTHONPATH, for a child process."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])}


def self_test(target: Path | None, model: Path | None, threads: int = 2) -> dict:
    """Load the build in a fresh interpreter (PYTHONPATH=target first) and run the invariance check on `model`."""
    env = pythonpath_first(dict(os.environ), target) if target is not None else dict(os.environ)
    env.pop("GGML_CPU_BATCH_INVARIANT", None)  # exact mode sets it itself on a patched build
    if model is None:
        code = "import json; from kvfork.engine.llama import system_info; " \
               "print(json.dumps({'system_info': system_info(), 'cases': []}))"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "kvfork.engine.invariance", str(model), "--threads", str(threads)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise EngineError(f"the new build does not load or run: {run.stderr.strip()[-500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _model_for_test() -> Path | None:
    from kvfork.models import cache_dir

    path = cache_dir() / "gemma3-270m.gguf"
    return path if path.exists() else None


def _run(args: argparse.Namespace) -> int:
    target = args.target.resolve() if args.target else None
    with tempfile.TemporaryDirectory(prefix="kvfork-build-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        sdist = fetch_sdist(folder)
        print(f"llama-cpp-python {SDIST_VERSION} source: sha256 {SDIST_SHA256[:16]}... ok", file=sys.stderr)
        tree = apply_patch(sdist, folder, patch_file())
        print(f"applied {PATCH_NAME}; building for {'any x86-64-v3 CPU' if args.portable else 'this CPU'}"
              f" into {target or 'this environment'} (6-11 minutes on 2 cores) ...", file=sys.stderr, flush=True)
        build(tree, target=target, portable=args.portable)
    report = self_test(target, None if args.skip_test else _model_for_test())
    if "BATCH_INVARIANT = 1" not in report["system_info"]:
        print("error: the installed build does not announce BATCH_INVARIANT = 1", file=sys.stderr)
        return 2
    cases = report["cases"]
    failed = [c for c in cases if not c["equal"]]
    if failed:
        print(f"error: {len(failed)} of {len(cases)} invariance cases differ: {failed}", file=sys.stderr)
        return 2
    where = f"PYTHONPATH={target} " if target else ""
    tested = f"; {len(cases)} invariance cases bit-identical" if cases else " (self-test skipped: no gemma3-270m)"
    print(f"batch-invariant llama.cpp built{tested}; {where}exact mode now uses it")
    return 0


def add_build_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `kvfork build`."""
    p = subparsers.add_parser("build", help="build llama-cpp-python with kvfork's batch-invariant kernels (exact mode)")
    p.add_argument("--target", type=Path, default=None,
                   help="install into this folder (use it with PYTHONPATH) instead of this environment")
    p.add_argument("--portable", action="store_true", help="build for any x86-64-v3 CPU, not just this one")
    p.add_argument("--workdir", type=Path, default=None, help="where to unpack and build (default: a temp folder)")
    p.add_argument("--skip-test", action="store_true", help="skip the bitwise self-test on gemma3-270m")
    p.set_defaults(func=_run)
