"""Job: one HTTP request's work as the engine loop sees it, and the events it sends back to its handler."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from kvfork.engine.adapters import Adapter
from kvfork.engine.logprobs import TokenLogprob
from kvfork.engine.sampling import SamplingParams
from kvfork.reuse.config import ReuseConfig
from kvfork.scheduler.kv_sequence import KvSequence

__all__ = ["Event", "Sink", "Job", "Usage"]

_ids = itertools.count(1)


@dataclass(frozen=True)
class Usage:
    """Token accounting of one request; cached = prompt tokens taken from a live prefix, not computed."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    placed_tokens: int = 0  # of the cached ones: placed segments (reuse modes; approximate KV)


@dataclass(frozen=True)
class Event:
    """What the loop thread tells a handler: text for a choice, a choice's end, the request's end or failure."""

    kind: Literal["delta", "finish", "done", "error"]
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: Exception | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # a choice's, on its "finish" event, when asked for


class Sink:
    """Delivers events from the loop thread to one handler's asyncio queue (thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # NOTE: the handler's event loop is gone (server shutting down): nobody listens
            pass

    async def get(self) -> Event:
        return await self.queue.get()


@dataclass(eq=False)
class Job:
    """One request: its prompt tokens and one SamplingParams per choice (n choices share one prefill).

    Fields after `sink` belong to the loop thread: the choices' branches,
    how much text each choice has sent, and the prompt tokens this request had to compute.
    """

    tokens: list[int]
    params: list[SamplingParams]
    sink: Sink
    id: int = field(default_factory=lambda: next(_ids))
    t_arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    branches: list[KvSequence | None] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    computed: int = 0
    completion_tokens: int = 0
    first_token: bool = False
    done: bool = False
    on_end: Callable[[Job], None] | None = None
    # reuse modes (chat only): the prompt as pieces, (tokens, is a message's content), and the mode
    pieces: list[tuple[list[int], bool]] | None = None
    reuse: ReuseConfig | None = None
    placed: int = 0  # prompt tokens placed from segments instead of computed
    adapter: Adapter | None = None  # the LoRA decoder of every choice (the prompt is the base model's)

    @property
    def n(self) -> int:
        return len(self.params)

    @property
    def composed(self) -> bool:
        """Its prompt is placed by a reuse mode (approximate cells), not computed or forked exactly."""
        return self.reuse is not None and self.reuse.mode != "exact" and self.pieces is not None

    @property
    def finished(self) -> bool:
        return bool(self.ended) and all(self.ended)
