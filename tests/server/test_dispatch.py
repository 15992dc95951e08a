"""The dispatcher without HTTP or weights (the fake engine): a request arriving while another's prefill is under way
still shares it, and every reply is what a from-scratch run of its prompt gives."""

from __future__ import annotations

import pytest

from kvfork import Engine
from kvfork.config import ServerConfig
from kvfork.engine.sampling import SamplingParams
from kvfork.scheduler.prefix_cache import MIN_SUFFIX
from kvfork.server.dispatch import Dispatcher
from kvfork.server.job import Event, Job
from kvfork.server.metrics import ServerMetrics
from tests.support.text import long_text


class ListSink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def put(self, event: Event) -> None:
        self.events.append(event)

    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "delta")


@pytest.fixture
def small_batches(fake_engine):
    # NOTE: 32-token steps, so a long prompt is still prefilling when the next request comes.
    return fake_engine(n_ctx=2048, n_seq_max=16, n_batch=32, n_ubatch=32, exact=True)


def _job(engine: Engine, question: str, max_tokens: int = 6) -> Job:
    tokens = engine.tokenize(long_text(6) + "\n\n" + question, add_bos=True)
    return Job(tokens=tokens, params=[SamplingParams(max_tokens=max_tokens)], sink=ListSink())  # type: ignore[arg-type]


def _run(dispatcher: Dispatcher, jobs: list[Job]) -> None:
    while not all(j.done for j in jobs):
        dispatcher.make_room()
        dispatcher.after_step(dispatcher.sched.step())


@pytest.mark.parametrize("late_steps", [1, 10])  # cut back in flight; forked part of it once done
def test_a_late_request_joins_the_prefill_in_flight(small_batches, fake_engine, late_steps):
    engine = small_batches
    dispatcher = Dispatcher(engine, ServerConfig(live_prefixes=0), ServerMetrics())
    first = _job(engine, "Question one? " + "List each event in order. " * 8)  # ~500 bytes, ~270 shared
    second = _job(engine, "What about the valve?")
    dispatcher.plan([first])
    for _ in range(late_steps):
        dispatcher.after_step(dispatcher.sched.step())
    dispatcher.plan([second])
    _run(dispatcher, [first, second])
    assert first.sink.events[-1].kind == second.sink.events[-1].kind == "done"
    shared = next(i for i, (a, b) in enumerate(zip(first.tokens, second.tokens, strict=False)) if a != b)
    # the shared part is computed once: the second job computes its own part, and in exact mode at most
    # MIN_SUFFIX tokens more (it backs off from tiny chunks of its own and of the prompt in flight)
    assert first.computed == len(first.tokens)
    assert len(second.tokens) - shared <= second.computed <= len(second.tokens) - shared + MIN_SUFFIX
    # NOTE: the fake's tokens depend only on the cells each sequence sees (llama.cpp's CPU kernels also
    # round few-row chunks differently: the HTTP tests check exactness on gemma where prompts fit a step)
    ref = fake_engine(n_ctx=2048)
    for job in (first, second):
        assert job.sink.text() == ref.generate(job.tokens, max_tokens=6).text  # type: ignore[attr-defined]
    assert engine.scheduler.table.n_live == 0  # live_prefixes=0: everything was freed


@pytest.mark.parametrize("exact", [False, True])
def test_agents_sent_at_once_prefill_their_common_prefix_once(fake_engine, exact):
    engine = fake_engine(n_ctx=4096, n_seq_max=32, n_batch=64, n_ubatch=64, exact=exact)
    dispatcher = Dispatcher(engine, ServerConfig(), ServerMetrics())
    jobs = [_job(engine, f"Agent {i}: what does the report say about item {i}?") for i in range(8)]
    dispatcher.plan(jobs)
    _run(dispatcher, jobs)
    shared = min(next(i for i, (a, b) in enumerate(zip(jobs[0].tokens, j.tokens, strict=False)) if a != b)
                 for j in jobs[1:])
    assert jobs[0].computed == len(jobs[0].tokens)
    for job in jobs[1:]:  # each of the others computes its own part (in exact mode at most MIN_SUFFIX more)
        assert len(job.tokens) - shared <= job.computed <= len(job.tokens) - shared + MIN_SUFFIX
    ref = fake_engine(n_ctx=2048)
    for job in jobs:
        assert job.sink.events[-1].kind == "done"
        assert job.sink.text() == ref.generate(job.tokens, max_tokens=6).text  # type: ignore[attr-defined]


@pytest.mark.parametrize("exact", [False, True])
def test_the_next_turn_of_a_conversation_forks_the_finished_reply(fake_engine, exact):
    engine = fake_engine(n_ctx=4096, n_seq_max=16, exact=exact)
    dispatcher = Dispatcher(engine, ServerConfig(), ServerMetrics())
    first = _job(engine, "What happened first?", max_tokens=12)
    _plan_and_run(dispatcher, first)
    (reply,) = [e for e in first.sink.events if e.kind == "finish"]
    ref = fake_engine(n_ctx=2048)
    said = ref.generate(first.tokens, max_tokens=12)  # type: ignore[attr-defined]
    assert first.sink.text() == said.text
    # NOTE: the client sends the reply back; the fake's bytes are not UTF-8, so its tokens stand for the text
    history = first.tokens + list(said.tokens)
    second = Job(tokens=history + engine.tokenize("\n\nAnd what happened to the valve after that?", add_bos=False),
                 params=[SamplingParams(max_tokens=6)], sink=ListSink())  # type: ignore[arg-type]
    _plan_and_run(dispatcher, second)
    assert reply.finish_reason == "length"
    # the prompt and the reply were kept: only the new message is computed, and the reply's last token
    # (sampled, never decoded)
    new = len(second.tokens) - len(history)
    assert new >= MIN_SUFFIX  # NOTE: exact mode would back off from a shorter one (see MIN_SUFFIX)
    assert second.computed == new + 1
    assert second.sink.text() == ref.generate(second.tokens, max_tokens=6).text  # type: ignore[attr-defined]
    # the kept conversation is the cache's own: the cap on live prefixes frees it
    dispatcher.config = ServerConfig(live_prefixes=0)
    dispatcher.trim_live()
    assert engine.scheduler.table.n_live == 0


def _plan_and_run(dispatcher: Dispatcher, job: Job) -> None:
    dispatcher.plan([job])
    _run(dispatcher, [job])


@pytest.mark.parametrize(("n_seq_max", "max_running", "live", "cap"),
                         [(16, 16, None, 48), (64, 16, None, 48), (256, 16, None, 240), (256, 16, 5, 5)])
def test_idle_prefixes_kept_are_the_ids_max_running_leaves_unless_set(fake_engine, n_seq_max, max_running, live, cap):
    engine = fake_engine(n_ctx=1024, n_seq_max=n_seq_max, max_running=max_running)
    assert Dispatcher(engine, ServerConfig(live_prefixes=live), ServerMetrics()).live_cap == cap


def test_the_cap_on_idle_prefixes_evicts_the_least_recently_used(fake_engine):
    engine = fake_engine(n_ctx=4096, n_seq_max=8)
    dispatcher = Dispatcher(engine, ServerConfig(live_prefixes=2), ServerMetrics())
    jobs = [Job(tokens=engine.tokenize(f"Document {i}: " + long_text(1), add_bos=True),
                params=[SamplingParams(max_tokens=2)], sink=ListSink()) for i in range(4)]  # type: ignore[arg-type]
    for job in jobs:  # one after another: each leaves its prompt and its reply behind
        _plan_and_run(dispatcher, job)
    assert len(dispatcher.prefixes) == 2
    last, first = (dispatcher.prefixes.match(j.tokens) for j in (jobs[-1], jobs[0]))
    assert last is not None and last.n >= len(jobs[-1].tokens) - 1  # the newest stays
    assert first is None or first.n < len(jobs[0].tokens) // 2  # the oldest went
