"""The `kvfork` command line on a real model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvfork.cli import main
from tests.support.text import long_text


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_run_prints_answers_and_savings(tmp_path, capsys, gemma_path, mode):
    doc = tmp_path / "log.txt"
    doc.write_text(long_text(30))
    code = main([
        "run", "--model", str(gemma_path), "--doc", str(doc), "--plain", "--n-ctx", "2048",
        "--agent", "first: In short,", "--agent", "second: The main fault", "--max-tokens", "8", "--compare",
        *(["--exact"] if mode == "exact" else []),
    ])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0
    assert f"| {mode} mode" in captured.err
    assert "=== first (8 tokens" in out and "=== second (8 tokens" in out
    assert "reused from the snapshot" in out and "prefill time saved" in out
    if mode == "exact":
        assert "identical outputs: 2/2" in out
    else:  # equal up to rounding: 8 greedy tokens of a plain continuation may part at a near-tie, rarely
        assert "(fast mode: equal up to rounding)" in out


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["run", "--model", "nope-1b", "--doc", str(tmp_path / "x.txt"), "--agent", "a: b"]) == 2
    assert "error: " in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "kvfork", "run", "--doc", str(tmp_path / "missing.txt"),
                           "--model", "gemma3-270m", "--agent", "a: b"], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot read --doc" in proc.stderr and "Traceback" not in proc.stderr
