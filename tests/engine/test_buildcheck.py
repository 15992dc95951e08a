"""The llama.cpp build check: the installed build against this CPU, a build for another CPU named before it
can die of SIGILL, and `kvfork doctor`."""

from __future__ import annotations

import pytest

from kvfork.cli import main
from kvfork.engine import llama
from kvfork.engine.buildcheck import cpu_flags, missing_features, probe
from kvfork.errors import EngineError

INFO = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 |"


def test_the_installed_build_runs_here():
    report = probe()
    assert report.ok, report
    assert "CPU :" in report.system_info and report.crashed is None and report.missing == ()


def test_features_the_cpu_lacks_are_named():
    assert missing_features(INFO, frozenset({"pni", "avx", "avx2", "avx512_bf16"})) == []
    assert missing_features(INFO, frozenset({"pni", "avx", "avx2"})) == ["AVX512_BF16"]
    assert missing_features(INFO, frozenset({"pni"})) == ["AVX", "AVX2", "AVX512_BF16"]
    assert missing_features(INFO, None) == []  # flags unknown: no claim either way


def test_cpu_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_bf16"})
    info.write_text("processor\t: 0\nFeatures\t: neon\n")
    assert cpu_flags(info) is None
    assert cpu_flags(tmp_path / "absent") is None


def test_the_engine_refuses_a_build_for_another_cpu(monkeypatch, gemma_path):
    monkeypatch.setattr(llama, "_backend_ready", False)
    monkeypatch.setattr(llama, "cpu_flags", lambda: frozenset({"fpu"}))  # a CPU with none of the build's sets
    with pytest.raises(EngineError, match="kvfork doctor --fix"):
        llama.LlamaModel(gemma_path)


def test_doctor_says_the_build_runs(capsys):
    assert main(["doctor"]) == 0
    assert "runs on this CPU" in capsys.readouterr().out
