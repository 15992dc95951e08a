"""Fakes for the logic that needs no model: FakeBackend (llama.cpp's cell rule, logits seeded by the
tokens a sequence sees) and FakeModel (bytes as tokens, a ChatML-like template)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from kvfork.engine.batch import Batch
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import ContextOverflow, EngineError


@dataclass
class FakeCell:
    pos: int
    token: int
    ids: set[int]


class FakeSampler:
    """Greedy (argmax) or seeded softmax sampling over the fake's logits; penalties and grammars are refused."""

    def __init__(self, backend: FakeBackend, params: SamplingParams, seed: int) -> None:
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            raise NotImplementedError("the fake backend has no penalties")
        if params.json_schema is not None:
            raise NotImplementedError("the fake backend has no grammar sampler")
        self.backend, self.params = backend, params
        self.rng = np.random.default_rng(seed)

    def accept(self, token: int) -> None:
        pass

    def sample(self, index: int) -> int:
        logits = self.backend.logits(index)
        if self.params.greedy:
            return int(np.argmax(logits))
        p = np.exp((logits - logits.max()) / self.params.temperature)
        return int(self.rng.choice(len(p), p=p / p.sum()))

    def close(self) -> None:
        pass


class FakeBackend:
    """llama.cpp's unified KV cache without a model: a cell is (position, token, set of sequence ids).

    The logits after a token are a pseudo-random vector seeded by exactly the tokens its sequence
    sees (its cells up to that position, in position order), so a fork that shares the wrong cells,
    or a sequence with two cells at one position, generates other tokens than a from-scratch run.
    Token 0 ends generation; token t's text is one letter, except 60 and 61: the two bytes of "é".
    `fail_next` makes the next decode raise it after writing `fail_after` of its tokens (as llama.cpp
    keeps the ubatches before the failing one).
    """

    def __init__(self, n_ctx: int = 4096, n_batch: int = 512, n_vocab: int = 64, n_swa: int = 0,
                 model: FakeModel | None = None) -> None:
        self.n_ctx, self.n_batch, self.n_vocab, self.n_swa = n_ctx, n_batch, n_vocab, n_swa
        self.invariant = False  # NOTE: as llama.cpp's fallback kernels: exact mode keeps its MIN_SUFFIX rule
        self.model = model  # an Engine's fake model: its vocabulary replaces the letters below
        if model is not None:
            self.n_vocab = model.n_vocab
        self.cells: list[FakeCell] = []
        self.n_compactions = 0
        self.decodes: list[Batch] = []
        self.adapters: tuple = ()
        self.adapter_log: list[tuple] = []
        self.fail_next: Exception | None = None
        self.fail_after = 0
        self._logits: dict[int, np.ndarray] = {}

    # -- the Backend protocol ------------------------------------------------------------------
    def decode(self, batch: Batch) -> None:
        if not 0 < len(batch) <= self.n_batch:
            raise EngineError(f"batch of {len(batch)} tokens; must be 1..{self.n_batch}")
        self._logits = {}
        n_write = len(batch)
        error, self.fail_next = self.fail_next, None
        if error is not None:
            n_write = self.fail_after
        if len(self.cells) + n_write > self.n_ctx:
            raise ContextOverflow(f"no room in the fake cache ({self.n_ctx} cells)")
        for i in range(n_write):
            seq_id, pos = batch.seq_ids[i], batch.positions[i]
            assert pos not in self.positions(seq_id), f"sequence {seq_id} already has a cell at {pos}"
            self.cells.append(FakeCell(pos, batch.tokens[i], {seq_id}))
        if error is not None:
            raise error
        self.decodes.append(batch)
        self.adapter_log.append(self.adapters)
        for i, wants in enumerate(batch.logits):
            if wants:
                self._logits[i] = self.next_logits(self.history(batch.seq_ids[i], batch.positions[i]))

    def logits(self, index: int) -> np.ndarray:
        if index not in self._logits:
            raise EngineError(f"no logits at batch index {index} of the last decode")
        return self._logits[index].copy()

    def sampler(self, params: SamplingParams, seed: int) -> FakeSampler:
        return FakeSampler(self, params, seed)

    def set_adapters(self, adapters) -> None:
        self.adapters = tuple(adapters)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        for cell in self.cells:
            if src in cell.ids and self._within(cell.pos, p0, p1):
                cell.ids.add(dst)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        for cell in self.cells:
            if self._within(cell.pos, p0, p1):
                cell.ids.discard(seq_id)
        self.cells = [c for c in self.cells if c.ids]
        return True

    def state_seq_get(self, seq_id: int) -> bytes:
        rows = sorted((c.pos, c.token) for c in self.cells if seq_id in c.ids)
        return np.array(rows, dtype=np.int32).tobytes()

    def state_seq_set(self, seq_id: int, data: bytes) -> None:
        rows = np.frombuffer(data, dtype=np.int32).reshape(-1, 2)
        if len(self.cells) + len(rows) > self.n_ctx:
            raise ContextOverflow("no room in the fake cache to restore this state")
        self.cells += [FakeCell(int(pos), int(token), {seq_id}) for pos, token in rows]

    def compact(self) -> None:
        """The fake's cells are a list with no holes: only counted (the scheduler's exact-mode rule)."""
        self.n_compactions += 1

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token) if self.model is not None else token == 0

    def token_bytes(self, token: int) -> bytes:
        if self.model is not None:
            return self.model.token_bytes(token)
        return {60: b"\xc3", 61: b"\xa9"}.get(token, bytes([ord("a") + token % 26]))

    def seq_pos_min(self, seq_id: int) -> int:
        return min(self.positions(seq_id), default=-1)

    def close(self) -> None:
        pass

    # -- what tests look at ----------------------------------------------------------------------
    def next_logits(self, tokens: list[int]) -> np.ndarray:
        """The logits after `tokens`: what a from-scratch run of them gives."""
        seed = zlib.crc32(np.array(tokens, dtype=np.int32).tobytes())
        return np.random.default_rng(seed).standard_normal(self.n_vocab).astype(np.float32)

    def greedy(self, tokens: list[int], n: int, *, ignore_eos: bool = True) -> list[int]:
        """The tokens a from-scratch greedy run of n steps after `tokens` generates."""
        tokens, out = list(tokens), []
        for _ in range(n):
            token = int(np.argmax(self.next_logits(tokens)))
            if token == 0 and not ignore_eos:
                break
            out.append(token)
            tokens.append(token)
        return out

    def history(self, seq_id: int, pos: int) -> list[int]:
        return [c.token for c in sorted(self.cells, key=lambda c: c.pos) if seq_id in c.ids and c.pos <= pos]

    def positions(self, seq_id: int) -> list[int]:
        return sorted(c.pos for c in self.cells if seq_id in c.ids)

    @staticmethod
    def _within(pos: int, p0: int, p1: int) -> bool:
        return (p0 < 0 or pos >= p0) and (p1 < 0 or pos < p1)


class FakeModel:
    """What an Engine needs of a model besides weights: a byte-level vocabulary (token t < 256 is byte t)
    with a BOS, two chat markers and an end-of-turn token, and a ChatML-like chat template."""

    BOS, END = 256, 258
    SPECIAL = {"<|im_start|>": 257, "<|im_end|>": 258}
    n_vocab, n_ctx_train, n_swa, description = 259, 32768, 0, "fake byte-level model"
    chat_template, knows_tools = "chatml-like", False

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        out = [self.BOS] if add_special else []
        pieces = [text]
        if parse_special:
            for marker in self.SPECIAL:
                pieces = [part for piece in pieces for part in _split_keep(piece, marker)]
        for piece in pieces:
            out += [self.SPECIAL[piece]] if parse_special and piece in self.SPECIAL else list(piece.encode())
        return out

    def token_bytes(self, token: int) -> bytes:
        if token < 256:
            return bytes([token])
        return next((m.encode() for m, t in self.SPECIAL.items() if t == token), b"")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token == self.END

    def apply_chat_template(self, messages: list[tuple[str, str]], *, add_generation_prompt: bool) -> str:
        text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def close(self) -> None:
        pass


def _split_keep(text: str, marker: str) -> list[str]:
    parts = text.split(marker)
    return [p for i, part in enumerate(parts) for p in ((marker, part) if i else (part,)) if p]
