"""The fine-tuned-decoder measurements each arm's child answers (bench/arms.py, bench/prefillshare_serving.py).

kvfork (fast or exact): the base model prefills a prompt once and LoRA decoders decode over it, either
forked in the same context ("shared": zero-copy, the decoders batched per step) or handed over as a state
blob into a second context that holds the adapters ("handoff"). llama.cpp: what a user with fine-tuned
decoders runs today, one `Llama(lora_path=...)` per decoder (llama.cpp's defaults otherwise), each
computing the whole prompt under its own adapter, one after another.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["KvforkAdapters", "LlamaCppAdapters"]


class KvforkAdapters:
    """Mixed into KvforkChild: `self.engine` holds the base prefill; a second context receives hand-offs."""

    engine: Any
    make_engine: Any

    def load_adapters(self, adapters: dict[str, str]) -> dict[str, Any]:
        """Load each named adapter into the engine and into a second context (made here) for hand-offs."""
        self._decoder = self.make_engine()
        for name, path in adapters.items():
            for e in (self.engine, self._decoder):
                e.load_adapter(name, path)
        return {"loaded": list(adapters)}

    def decoders(self, arm: str, doc: str, instructions: list[str], names: list[str],
                 max_tokens: int) -> dict[str, Any]:
        """One arm over `doc`: TTFT of each decoder from the arm's start, end to end, and the tokens."""
        t0 = time.perf_counter()
        if arm == "shared":
            with self.engine.prefill(doc) as snapshot:
                prefilled = time.perf_counter() - t0
                outs = snapshot.fan_out(instructions, adapters=names, max_tokens=max_tokens, ignore_eos=True)
            return {"ttft": [prefilled + o.ttft_s for o in outs], "e2e": time.perf_counter() - t0,
                    "prefill_s": prefilled, "tokens": [list(o.tokens) for o in outs]}
        assert arm == "handoff", arm
        ttft, tokens, moves = [], [], []
        with self.engine.prefill(doc) as snapshot:
            prefilled = time.perf_counter() - t0
            t1 = time.perf_counter()
            host = snapshot.to_host()  # NOTE: llama_state_seq_get_data: the blob to hand over
            capture_s = time.perf_counter() - t1
        for instruction, name in zip(instructions, names, strict=True):
            t2 = time.perf_counter()
            with self._decoder.restore(host) as received:  # llama_state_seq_set_data in the decoder's context
                moves.append(time.perf_counter() - t2)
                start = time.perf_counter() - t0
                out = received.fan_out([instruction], adapters=[name], max_tokens=max_tokens,
                                       ignore_eos=True)[0]
            ttft.append(start + out.ttft_s)
            tokens.append(list(out.tokens))
        return {"ttft": ttft, "e2e": time.perf_counter() - t0, "prefill_s": prefilled, "tokens": tokens,
                "capture_s": capture_s, "restore_s": moves, "blob_bytes": len(host.state)}


class LlamaCppAdapters:
    """Mixed into LlamaCppChild: one Llama per fine-tuned decoder, as llama-cpp-python loads a LoRA."""

    llm: Any
    model_path: str
    llama_kwargs: dict[str, Any]  # the child's own Llama settings (n_ctx, threads, flash attention)

    def lora_scratch(self, prompts: list[list[int]], adapters: list[str], max_tokens: int) -> dict[str, Any]:
        """Each prompt computed whole by the Llama of its adapter, one after another, greedy, every decoder
        to max_tokens (as kvfork's arms, with ignore_eos): TTFT from the start, end to end, tokens."""
        import llama_cpp

        if not hasattr(self, "_loras"):
            self._loras: dict[str, Any] = {}
        for path in adapters:  # NOTE: loading is not timed, as kvfork's load_adapters is not
            if path not in self._loras:
                self._loras[path] = llama_cpp.Llama(self.model_path, lora_path=path, **self.llama_kwargs)
        t0 = time.perf_counter()
        ttft, tokens = [], []
        for prompt, path in zip(prompts, adapters, strict=True):
            llm = self._loras[path]
            llm.reset()
            out: list[int] = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                if not out:
                    ttft.append(time.perf_counter() - t0)
                out.append(int(token))
                if len(out) >= max_tokens:
                    break
            tokens.append(out)
        return {"ttft": ttft, "e2e": time.perf_counter() - t0, "tokens": tokens}
