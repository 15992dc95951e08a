"""llama.cpp's own prefill and decode rates with two llama-cpp-python builds, side by side: the installed one
and another one installed into a folder (`pip install --target DIR`), e.g. to choose the flags of the build
`kvfork doctor --fix` makes.

    CMAKE_ARGS=-DGGML_NATIVE=OFF FORCE_CMAKE=1 pip install --no-deps --no-cache-dir --target /tmp/v3 \\
        llama-cpp-python==0.3.36                      # ggml's x86-64-v3 defaults, ~9 min on 2 cores
    python bench/build_rate.py --other /tmp/v3 [--repeats 3] [--model qwen2.5-coder-0.5b] [--tokens 2048]

Each measurement runs in its own process, the builds alternating, with llama.cpp's defaults (`Llama` with
n_ctx 4096 and as many threads as cores): a prefill of the bundled report's first --tokens tokens, then 32
single-token decodes after 512 tokens. Prints medians with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from workload import fmt, stats

from kvfork.engine.kernelbuild import pythonpath_first
from kvfork.models import resolve_model

_PROBE = textwrap.dedent('''
    import json, os, sys, time
    from importlib.resources import files
    import llama_cpp
    from llama_cpp import Llama

    path, n = sys.argv[1], int(sys.argv[2])
    llm = Llama(path, n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
    text = files("kvfork").joinpath("data/sample_report.txt").read_text(encoding="utf-8")
    tokens = llm.tokenize(text.encode())[:n]
    t = time.perf_counter()
    llm.eval(tokens)
    prefill = len(tokens) / (time.perf_counter() - t)
    llm.reset()
    llm.eval(tokens[:512])
    t = time.perf_counter()
    for token in tokens[512:544]:
        llm.eval([token])
    decode = 32 / (time.perf_counter() - t)
    info = llama_cpp.llama_print_system_info().decode()
    print(json.dumps({"prefill": prefill, "decode": decode, "tokens": len(tokens), "info": info}))
''')


def _run(model: str, tokens: int, path: str | None) -> dict:
    env = pythonpath_first(dict(os.environ), path) if path else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", _PROBE, model, str(tokens)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, help="a folder holding another llama-cpp-python build")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.tokens < 544:
        ap.error("--tokens must be at least 544: the decode runs 32 tokens after 512 of them")
    model = str(resolve_model(args.model))
    runs: dict[str, list[dict]] = {"installed": [], "other": []}
    for _ in range(args.repeats):
        for name, path in (("installed", None), ("other", args.other)):
            runs[name].append(_run(model, args.tokens, path))
    for name, rows in runs.items():
        print(f"{name}: {rows[0]['info'].strip()}")
        print(f"  prefill of {rows[0]['tokens']} tokens: {fmt(stats([r['prefill'] for r in rows]))} tok/s; "
              f"decode: {fmt(stats([r['decode'] for r in rows]))} tok/s")
    ratios = [a["prefill"] / b["prefill"] for a, b in zip(runs["installed"], runs["other"], strict=True)]
    print(f"prefill, installed / other (per repeat): {fmt(stats(ratios), 'x', digits=2)}")


if __name__ == "__main__":
    main()
