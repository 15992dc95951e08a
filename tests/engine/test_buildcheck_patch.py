"""`kvfork build`'s steps that need no compiler: the pinned source package's hash, the patch applying to it."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from kvfork.cli import build_parser
from kvfork.engine import kernelbuild
from kvfork.errors import EngineError


def _tarball(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_patch_is_found_and_names_the_pinned_source():
    text = kernelbuild.patch_file().read_text()
    assert kernelbuild.SDIST_SHA256 in text and f"llama-cpp-python {kernelbuild.SDIST_VERSION}" in text
    assert "GGML_CPU_BATCH_INVARIANT" in text and '"BATCH_INVARIANT", "1"' in text


def test_a_source_package_with_another_hash_is_refused(tmp_path):
    _tarball(tmp_path / f"llama_cpp_python-{kernelbuild.SDIST_VERSION}.tar.gz", {"x/README": "not it\n"})
    with pytest.raises(EngineError, match="not the source the patch was written for"):
        kernelbuild.fetch_sdist(tmp_path)


@pytest.mark.skipif(shutil.which("patch") is None, reason="the `patch` tool is not installed")
def test_a_patch_that_does_not_apply_is_refused(tmp_path):
    sdist = _tarball(tmp_path / "pkg.tar.gz", {"pkg/a.txt": "one\ntwo\n"})
    patch = tmp_path / "p.patch"
    patch.write_text("--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n-uno\n+one\n two\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(EngineError, match="does not apply"):
        kernelbuild.apply_patch(sdist, tmp_path / "out", patch)
    assert (tmp_path / "out" / "pkg" / "a.txt").read_text() == "one\ntwo\n"


@pytest.mark.skipif(not os.environ.get("KVFORK_LLAMA_SDIST") or shutil.which("patch") is None,
                    reason="set KVFORK_LLAMA_SDIST to llama_cpp_python-0.3.36.tar.gz (pip download --no-binary"
                    " :all: --no-deps llama-cpp-python==0.3.36) to check the patch against it")
def test_the_patch_applies_to_the_pinned_source(tmp_path):
    sdist = Path(os.environ["KVFORK_LLAMA_SDIST"])
    assert kernelbuild.sha256(sdist) == kernelbuild.SDIST_SHA256
    tree = kernelbuild.apply_patch(sdist, tmp_path, kernelbuild.patch_file())
    ops = (tree / "vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp").read_text()
    assert "ggml_compute_forward_flash_attn_ext_tiled_bi" in ops


def test_build_is_a_command():
    args = build_parser().parse_args(["build", "--target", "/tmp/x", "--skip-test"])
    assert args.command == "build" and args.target == Path("/tmp/x") and args.skip_test and callable(args.func)
