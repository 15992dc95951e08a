"""The catalog pull: joins wheel data members, verifies size and sha256, leaves nothing half-written."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from kvfork import CATALOG, ModelIntegrityError, ModelNotFound, resolve_model
from kvfork.models import ModelSpec, _join_and_verify, check_gguf


def _wheels(tmp_path, chunks):
    paths = []
    for i, data in enumerate(chunks):
        path = tmp_path / f"pkg_part{i + 1}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"pkg_part{i + 1}/data/part{i}.bin", data)
            zf.writestr(f"pkg_part{i + 1}/__init__.py", "raise SystemExit('never imported')")
        paths.append(path)
    return paths


def _spec(chunks, *, size=None, sha=None):
    whole = b"".join(chunks)
    return ModelSpec(
        name="toy", description="", version="1.0",
        parts=tuple((f"pkg-part{i + 1}", f"pkg_part{i + 1}/data/part{i}.bin") for i in range(len(chunks))),
        size=len(whole) if size is None else size,
        sha256=hashlib.sha256(whole).hexdigest() if sha is None else sha,
    )


def test_join_in_order_and_verify(tmp_path):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    out = tmp_path / "joined"
    _join_and_verify(_spec(chunks), _wheels(tmp_path, chunks), out)
    assert out.read_bytes() == b"".join(chunks)
    assert check_gguf(out) == out


@pytest.mark.parametrize("bad", [dict(size=1), dict(sha="0" * 64)])
def test_size_or_sha_mismatch_is_refused(tmp_path, bad):
    chunks = [b"GGUF" + b"x" * 10, b"y" * 10]
    with pytest.raises(ModelIntegrityError):
        _join_and_verify(_spec(chunks, **bad), _wheels(tmp_path, chunks), tmp_path / "joined")


def test_missing_member_is_refused(tmp_path):
    chunks = [b"GGUF", b"z"]
    wheels = _wheels(tmp_path, chunks)
    spec = _spec(chunks)
    parts = (spec.parts[0], ("pkg-part2", "pkg_part2/data/other.bin"))
    spec = ModelSpec(spec.name, "", "1.0", parts, spec.size, spec.sha256)
    with pytest.raises(ModelIntegrityError, match="lacks"):
        _join_and_verify(spec, wheels, tmp_path / "joined")


def test_catalog_models_resolve_to_verified_files(gemma_path, qwen_path):
    for name, path in (("gemma3-270m", gemma_path), ("qwen2.5-coder-0.5b", qwen_path)):
        assert path.stat().st_size == CATALOG[name].size
        assert resolve_model(name, download=False) == path
    assert not list(gemma_path.parent.glob("kvfork-pull-*")), "no half-written pull left behind"


def test_unknown_name_lists_the_catalog():
    with pytest.raises(ModelNotFound, match="qwen2.5-coder-0.5b"):
        resolve_model("llama-70b")
