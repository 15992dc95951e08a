"""Shared fixtures: the real catalog models, pulled once per machine (~/.cache/kvfork or $KVFORK_CACHE),
and a fake backend for the logic that needs no model (`pytest -m "not model and not cluster"` runs only that).
"""

from __future__ import annotations

import os

import pytest

from kvfork import Engine, resolve_model
from kvfork.config import default_threads
from tests.support.fakes import FakeBackend, FakeModel
from tests.support.models import GEMMA

# NOTE: a test that needs one of these fixtures loads a GGUF; it is marked `model`.
_MODEL_FIXTURES = {"gemma_path", "qwen_path", "model_path"}
# NOTE: one that needs this one starts a local Ray cluster and deploys on Serve (seconds each); marked `cluster`.
_CLUSTER_FIXTURES = {"ray_serve"}
_GROUP = pytest.StashKey[str]()


# NOTE: the groups that take a minute or more on 2 cores; xdist hands groups out in collection order, so
# these start first and no long one starts last while the other workers sit idle
_LONG_GROUPS = ("tests/train/test_train_decoder.py", "tests/engine/test_fast.py", "tests/engine/test_exactness.py",
                "ray", "tests/server/test_sharing.py", "tests/engine/test_adapters.py")


@pytest.hookimpl(tryfirst=True)  # NOTE: before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if _MODEL_FIXTURES & fixtures:
            item.add_marker(pytest.mark.model)
        if _CLUSTER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.cluster)
        # NOTE: with pytest-xdist (`--dist loadgroup`), a module runs on one worker, so its module fixtures
        # (a training run, a server) are built once; every Ray test shares one worker and one local cluster
        group = "ray" if _CLUSTER_FIXTURES & fixtures else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
        item.stash[_GROUP] = group
    items.sort(key=lambda it: _LONG_GROUPS.index(it.stash[_GROUP]) if it.stash[_GROUP] in _LONG_GROUPS
               else len(_LONG_GROUPS))  # NOTE: stable: the rest keep their order


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core this process may run on, at most 4 (each holds its own engines)."""
    return max(1, min(4, default_threads()))


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker runs on its own share of the cores, so that its engines (whose default n_threads is
    the affinity mask's size), its torch and its subprocesses do not contend with the other workers' for
    a core: ggml's threads wait for each other at every op, and a thread that lost its core stalls them all."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index, n = int(worker.removeprefix("gw")), int(count)
    share = cores[index::n] or [cores[index % len(cores)]]
    os.sched_setaffinity(0, share)

# NOTE: one pytest process hosts engines of both modes, and exact mode needs ggml's tiled matmul off,
# which ggml reads once per process (see engine/llama.py). Fast-mode tests here run without it; the
# fast defaults as users get them (tiled matmul on) are tested in a subprocess (tests/engine/test_fast.py).
os.environ.setdefault("GGML_CPU_TILED_MM", "0")


@pytest.fixture(scope="session")
def gemma_path():
    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def qwen_path():
    return resolve_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma(gemma_path):
    """A shared engine for tests that do not care what else lives in the context."""
    with Engine(gemma_path, n_ctx=4096, n_seq_max=8, **GEMMA) as engine:
        yield engine


@pytest.fixture(scope="session")
def gemma_ref(gemma_path):
    """A second engine (its own context) for from-scratch reference runs."""
    with Engine(gemma_path, n_ctx=4096, n_seq_max=8, **GEMMA) as engine:
        yield engine


@pytest.fixture(scope="session")
def adapter_files(gemma_path, tmp_path_factory):
    """Two real LoRA GGUFs for gemma3-270m (random weights, large enough to change greedy outputs)."""
    from kvfork.train.gguf_lora import random_lora_gguf

    folder = tmp_path_factory.mktemp("adapters")
    return {
        name: random_lora_gguf(gemma_path, folder / f"{name}.gguf", rank=8, std=0.05, seed=seed,
                               targets=("attn_q", "attn_v", "ffn_up"))
        for name, seed in (("planner", 1), ("coder", 2))
    }


@pytest.fixture
def fake_engine(tmp_path):
    """fake_engine(store=None, **EngineConfig fields): an Engine on FakeModel + FakeBackend (no weights),
    closed after the test."""
    from kvfork.config import EngineConfig

    made = []
    path = tmp_path / "fake.gguf"  # NOTE: a file, so that state layouts (restores) can fingerprint it
    path.write_bytes(b"GGUF fake model")

    def make(store=None, **config) -> Engine:
        cfg = EngineConfig(**{"n_ctx": 4096, **config})
        model = FakeModel()
        engine = Engine.on(path, model, FakeBackend(cfg.n_ctx, cfg.n_batch, model=model), cfg, store=store)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def fake_backend():
    """FakeBackend, the class: make one per test with the context size the test needs."""
    return FakeBackend
