"""Snapshot: a prefilled shared context held live in the engine's KV cache, ready to fork."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

from kvfork.engine.sampling import SamplingParams
from kvfork.prompt import ChatLayout
from kvfork.result import Completion
from kvfork.runtime import warm
from kvfork.runtime.branch import Branch
from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.store.host import HostSnapshot

if TYPE_CHECKING:
    from kvfork.engine.adapters import Adapter
    from kvfork.reuse.report import ReuseReport
    from kvfork.runtime.engine import Engine

__all__ = ["Snapshot"]


class Snapshot:
    """The KV cells of a shared prefix under one sequence id, pinned while any branch shares them.

    Forking is zero-copy: a branch's sequence id is added to the snapshot's cells. Closing the
    snapshot frees its cells once the last branch that shares them is closed.
    A parked snapshot (`park`) holds its cells in host RAM instead; any use brings them back first.
    """

    def __init__(self, engine: Engine, seq: KvSequence, layout: ChatLayout | None, prefill_s: float) -> None:
        self._engine = engine
        self._seq = seq
        self._parked: HostSnapshot | None = None  # its cells while parked (then _seq is released)
        self.layout = layout
        self.prefill_s = prefill_s  # seconds the prefill took (0 for a restore)
        self.reuse: ReuseReport | None = None  # set by Engine.compose: what was reused, placed, computed

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def sequence(self) -> KvSequence:
        """The scheduler's sequence behind this snapshot, its cells brought back first if it is parked
        (read it; only the scheduler changes it)."""
        self.unpark()
        return self._seq

    @property
    def parked(self) -> bool:
        return self._parked is not None

    @property
    def tokens(self) -> list[int]:
        return list(self._seq.tokens)

    @property
    def n_tokens(self) -> int:
        return len(self._seq.tokens)

    def park(self) -> bool:
        """Move this snapshot's cells to host RAM and free them in the context, until its next use; did it?

        Not while it is running, or where its forks share half of its cells or more (they would stay, and
        a restore would copy them again).
        The engine parks idle snapshots itself before other work (EngineConfig.park_idle).
        """
        with self._engine.lock:  # NOTE: one thread parks or brings it back at a time
            if self._parked is None:
                self._parked = self._engine.parking.park(self)
            return self._parked is not None

    @property
    def chat(self) -> bool:
        return self.layout is not None

    def fork(self, *, adapter: str | Adapter | None = None) -> Branch:
        """A new branch that shares this snapshot's cells; it continues at position n_tokens.

        adapter: the LoRA decoder (a name given to Engine.load_adapter) that decodes the branch.
        """
        return self._engine.fork(self, adapter=adapter)

    def fan_out(
        self,
        instructions: Seq[str],
        *,
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[str | Adapter | None] | None = None,
        **sampling: Any,
    ) -> list[Completion]:
        """Fork one branch per instruction, prefill the instructions as one batch, decode all together.

        `params` may give one SamplingParams per instruction; keywords apply to all. `adapters` gives
        each instruction its LoRA decoder (None: the base model). The branches are closed afterwards;
        use `fork` for branches that go on for more turns.
        """
        if isinstance(params, SamplingParams) or params is None:
            base = params or self._engine.sampling()
            per = [base.with_overrides(**sampling) if sampling else base] * len(instructions)
        else:
            if len(params) != len(instructions):
                raise ValueError(f"{len(params)} SamplingParams for {len(instructions)} instructions")
            per = [p.with_overrides(**sampling) if sampling else p for p in params]
        if adapters is None:
            adapters = [None] * len(instructions)
        elif len(adapters) != len(instructions):
            raise ValueError(f"{len(adapters)} adapters for {len(instructions)} instructions")
        branches: list[Branch] = []
        try:
            for text, adapter in zip(instructions, adapters, strict=True):
                branches.append(self.fork(adapter=adapter).send(text))
            return self._engine.generate_branches(branches, per, close=True)
        finally:
            for branch in branches:
                branch.close()

    def unpark(self) -> None:
        """Bring a parked snapshot's cells back into the context now (any use does). Raises
        ContextOverflow where there is no room; it stays parked then."""
        with self._engine.lock:
            if self._parked is not None:
                self._seq = self._engine.parking.unpark(self, self._parked)
                self._parked = None

    def to_host(self) -> HostSnapshot:
        """Copy this snapshot's cells to host memory (it stays live): save it, or restore it elsewhere
        with `Engine.restore`."""
        if self._parked is not None:
            return self._parked
        return warm.capture(self)

    def close(self) -> None:
        self._parked = None  # NOTE: a parked snapshot's sequence is released already
        self._engine.release(self)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
