"""The llama.cpp build check: the installed build against this CPU, a build for another CPU named before it
can die of SIGILL, and `kvfork doctor`."""

from __future__ import annotations

import pytest

from kvfork.cli import main
from kvfork.engine import llama
from kvfork.engine.buildcheck import cmake_args, cpu_flags, crashing_features, missing_features, probe
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


def test_amx_kernels_are_named_as_crashing_where_the_cpu_runs_them():
    amx = INFO + " AMX_INT8 = 1 |"
    assert crashing_features(amx, frozenset({"pni", "avx", "avx2", "avx512_bf16", "amx_int8"})) == ["AMX_INT8"]
    assert crashing_features(amx, frozenset({"pni", "avx", "avx2", "avx512_bf16"})) == []  # missing instead
    assert missing_features(amx, frozenset({"pni", "avx", "avx2", "avx512_bf16"})) == ["AMX_INT8"]
    assert crashing_features(INFO, frozenset({"amx_int8"})) == []  # not compiled in
    assert crashing_features(amx, None) == []


def test_the_rebuild_targets_this_cpu_without_amx():
    args = cmake_args(frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512vl",
                                 "avx512dq", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"})).split()
    assert args[0] == "-DGGML_NATIVE=OFF" and "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_VNNI=ON" in args
    assert "-DGGML_AVX512_BF16=OFF" in args and "-DGGML_AVX_VNNI=OFF" in args
    assert not any("AMX" in a for a in args)  # ggml's AMX switches default to off
    # AVX512F alone is not ggml's AVX512 (it passes -mavx512cd/vl/dq/bw too)
    assert "-DGGML_AVX512=OFF" in cmake_args(frozenset({"avx2", "avx512f"})).split()
    assert cmake_args(None) == "-DGGML_NATIVE=OFF"  # flags unknown: ggml's x86-64-v3 defaults


def test_the_engine_refuses_repacked_weights_on_a_build_whose_amx_kernels_crash(monkeypatch, gemma_path):
    flags = cpu_flags() or frozenset()
    monkeypatch.setattr(llama, "cpu_flags", lambda: flags | {"amx_int8"})
    monkeypatch.setattr(llama, "system_info", lambda: INFO + " AMX_INT8 = 1 |")
    with pytest.raises(EngineError, match=r"AMX_INT8.*llama.cpp #20824.*kvfork doctor --fix"):
        llama.LlamaModel(gemma_path, repack=True)
    llama.LlamaModel(gemma_path, vocab_only=True)  # without repacked weights it loads


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
