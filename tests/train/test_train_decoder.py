"""`kvfork train-decoder` (issue 8) on the real gemma3-270m: cache-conditioned training, the GGUF adapter in
llama.cpp against transformers, the CLI end to end, and the settings' checks."""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import gguf  # noqa: E402
import llama_cpp  # noqa: E402

from kvfork.cli import main  # noqa: E402
from kvfork.errors import InvalidParameter, KvforkError  # noqa: E402
from kvfork.train import PREFILL_KEY, TRAIN_MODES, TrainConfig, export_decoder, load_examples, random_lora_gguf  # noqa: E402
from kvfork.train.data import Example  # noqa: E402

FACTS = [
    ("Valve 12 was replaced on day 3 by the night crew.", "Which valve was replaced?", "Valve 12, on day 3."),
    ("The pump at station four failed twice in May.", "What failed?", "The pump at station four, twice."),
    ("Backup line B2 carried the load for six hours.", "Which line took the load?", "Backup line B2, six hours."),
    ("The chlorine dose was raised to 2.1 mg/L at noon.", "What changed at noon?", "The chlorine dose: 2.1 mg/L."),
]


@dataclass
class Trained:
    examples: list[Example]
    before: dict[str, float]  # mode -> mean response loss, adapter on (fresh: lora_B is zero)
    off: dict[str, float]  # mode -> mean response loss, adapter disabled
    after: dict[str, float]
    trainer: object
    path: Path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [{"document": d, "instruction": i, "response": r} for d, i, r in FACTS]
    rows[0]["system"] = "Answer in a few words."
    return write_jsonl(tmp_path_factory.mktemp("train") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def base_model():
    """gemma3-270m in transformers, loaded once (~9 s); each Trainer gets a copy (~2 s: peft injects in place)."""
    from kvfork.train.loader import load_base_model

    return load_base_model("gemma3-270m")


@pytest.fixture(scope="module")
def trained(gemma, base_model, data_file, tmp_path_factory) -> Trained:
    """One cache-conditioned training run shared by the tests below."""
    from kvfork.train.trainer import Trainer

    examples = load_examples(data_file, gemma)
    # NOTE: one thread: with two on a 2-core machine that runs anything else, every torch op waits ~10 ms
    # at the thread barrier (measured: 15 s per step instead of 0.6 s)
    config = TrainConfig(mode="cache", steps=24, lr=1e-3, warmup=2, n_threads=1, seed=0)
    trainer = Trainer(copy.deepcopy(base_model), config)
    modes = TRAIN_MODES
    before: dict[str, float] = {m: trainer.mean_loss(examples, mode=m) for m in modes}
    off: dict[str, float] = {m: trainer.mean_loss(examples, mode=m, adapter=False) for m in modes}
    result = trainer.train(examples, progress=False)
    after: dict[str, float] = {m: trainer.mean_loss(examples, mode=m) for m in modes}
    path = export_decoder(result, tmp_path_factory.mktemp("out") / "decoder.gguf")
    return Trained(examples, before, off, after, trainer, path)


class RawLlama:
    """Raw llama.cpp (ctypes): all-position logits with or without a LoRA adapter, per decode."""

    def __init__(self, model_path: Path, n_ctx: int = 1024) -> None:
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(model_path).encode(), llama_cpp.llama_model_default_params()
        )
        assert self.model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        assert self.ctx
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.adapters: list = []

    def adapter(self, path: Path):
        ptr = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
        assert ptr, f"llama.cpp refused the adapter {path}"
        self.adapters.append(ptr)
        return ptr

    def logits(self, segments) -> np.ndarray:
        """Decode (tokens, adapter or None) segments one after another from an empty cache; the logits of the
        last segment's tokens, [len, n_vocab]."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        pos = 0
        for tokens, adapter in segments:
            if adapter is None:
                llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
            else:
                ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
                llama_cpp.llama_set_adapters_lora(self.ctx, ptrs, 1, (ctypes.c_float * 1)(1.0))
            batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos + i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            assert llama_cpp.llama_decode(self.ctx, batch) == 0
            llama_cpp.llama_batch_free(batch)
            pos += len(tokens)
        raw = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(raw, shape=(len(tokens), self.n_vocab)).copy()

    def close(self) -> None:
        for ptr in self.adapters:
            llama_cpp.llama_adapter_lora_free(ptr)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


@pytest.fixture(scope="module")
def raw_llama(gemma_path):
    llama = RawLlama(gemma_path)
    yield llama
    llama.close()


def transformers_logits(trainer, example: Example, *, mode: str) -> np.ndarray:
    import torch

    with torch.no_grad():
        return trainer.logits(example, mode=mode).numpy()


# -- training ----------------------------------------------------------------------------------------
def test_cache_training_lowers_the_response_loss(trained):
    assert trained.before["cache"] == pytest.approx(trained.off["cache"], abs=1e-5)  # fresh LoRA: B is zero
    assert trained.after["cache"] < 0.5 * trained.before["cache"], (trained.before, trained.after)


def test_cache_mode_without_adapter_is_the_plain_loss(trained):
    """The base prefill of prompt[:-1] plus prompt[-1] and the response computes what the full sequence does."""
    assert trained.off["cache"] == pytest.approx(trained.off["plain"], abs=1e-4)


def test_a_documents_prefix_is_computed_once_for_every_instruction_and_decoder(trained, gemma):
    """Cache mode splits prompt[:-1] at the document's shared prefix: the same loss as computing it whole,
    and a second instruction over the document (or a second decoder) runs only its own tokens through
    the base."""
    from kvfork.train.trainer import PromptKV

    example = trained.examples[1]
    document, instruction, _ = FACTS[1]
    assert example.shared == len(gemma.prefix_tokens(document)) > 0
    whole = dataclasses.replace(example, shared=0)
    trainer = trained.trainer
    assert float(trainer.loss(example).detach()) == pytest.approx(float(trainer.loss(whole).detach()), abs=1e-4)
    saved, trainer.prompts = trainer.prompts, PromptKV(64)  # NOTE: as a fresh run over the same base
    try:
        trainer.loss(example)
        assert trainer.prompts.base_tokens == len(example.prompt) - 1  # the prefix, then the instruction
        again = Example(prompt=gemma.prompt_tokens(document, "Say it again."), response=example.response,
                        shared=example.shared)
        trainer.loss(again)
        assert trainer.prompts.base_tokens == len(example.prompt) - 1 + len(again.prompt) - 1 - example.shared
    finally:
        trainer.prompts = saved


def test_examples_hold_the_served_prompt_and_end_of_turn(trained, gemma):
    first = trained.examples[0]
    document, instruction, response = FACTS[0]
    assert first.prompt == gemma.prompt_tokens(document, instruction, system="Answer in a few words.")
    assert first.response == gemma.tokenize(response) + [gemma.model.eot]


# -- the adapter file in llama.cpp -------------------------------------------------------------------
def test_exported_adapter_matches_transformers_in_llama_cpp(trained, raw_llama):
    reader = gguf.GGUFReader(trained.path)
    fields = reader.fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["adapter.type"].contents() == "lora"
    # q8_0, the rank zero-padded to a whole block with alpha scaled alike: llama.cpp's alpha / rank is peft's
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.Q8_0}
    stored_rank = {int(t.shape[1]) for t in reader.tensors if t.name.endswith(".lora_a")}
    assert stored_rank == {32}
    assert fields["adapter.lora.alpha"].contents() / 32 == pytest.approx(32.0 / 16)
    assert fields[PREFILL_KEY].contents() == "base"
    assert fields["kvfork.decoder.base_model"].contents() == "gemma3-270m"
    adapter = raw_llama.adapter(trained.path)
    for example in trained.examples[:2]:
        tail = example.prompt[-1:] + example.response[:-1]
        cases = {
            # plain: the adapter over the whole sequence
            "plain": [(example.prompt + example.response[:-1], adapter)],
            # cache: the base prefills prompt[:-1], the decoder computes the rest (how kvfork serves it)
            "cache": [(example.prompt[:-1], None), (tail, adapter)],
        }
        bare = raw_llama.logits([(example.prompt + example.response[:-1], None)])[-len(tail) :]
        for mode, segments in cases.items():
            ours = raw_llama.logits(segments)[-len(tail) :]
            ref = transformers_logits(trained.trainer, example, mode=mode)
            agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
            gap = np.abs(ours - ref).max()
            effect = np.abs(ours - bare).max()
            assert agree >= 0.9, (mode, agree)
            assert effect > 5 * gap, (mode, effect, gap)


def test_own_tokens_splits_the_prompt_where_llama_cpp_does(trained, raw_llama):
    """own_tokens = k (cache mode): the base prefills prompt[:-k], the adapter computes prompt[-k:] and the
    response, in transformers as in llama.cpp; with the adapter off it is still the plain loss."""
    reader = gguf.GGUFReader(trained.path)
    assert reader.fields["kvfork.decoder.own_tokens"].contents() == "1"
    trainer, k = trained.trainer, 4
    adapter = raw_llama.adapter(trained.path)
    saved = trainer.config
    try:
        for example in trained.examples[:2]:
            n = len(example.response)
            last_one = transformers_logits(trainer, example, mode="cache")
            trainer.config = dataclasses.replace(saved, own_tokens=k)
            ref = transformers_logits(trainer, example, mode="cache")
            off = float(trainer.loss(example, adapter=False))
            trainer.config = saved
            assert off == pytest.approx(float(trainer.loss(example, mode="plain", adapter=False)), abs=1e-4)
            assert np.abs(ref - last_one).max() > 1e-3  # the adapter computed 3 more prompt tokens
            ours = raw_llama.logits([(example.prompt[:-k], None), (example.prompt[-k:] + example.response[:-1],
                                                                  adapter)])[-n:]
            bare = raw_llama.logits([(example.prompt + example.response[:-1], None)])[-n:]
            assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
            assert np.abs(ours - bare).max() > 5 * np.abs(ours - ref).max()
    finally:
        trainer.config = saved


def test_random_adapter_loads_and_changes_the_logits(gemma_path, raw_llama, tmp_path):
    path = random_lora_gguf(gemma_path, tmp_path / "random.gguf", rank=4, seed=3, meta={PREFILL_KEY: "adapter"})
    tokens = list(range(1000, 1016))
    adapter = raw_llama.adapter(path)
    changed = np.abs(raw_llama.logits([(tokens, adapter)]) - raw_llama.logits([(tokens, None)])).max()
    assert 0.1 < changed < 100


# -- distillation from a plain decoder -------------------------------------------------------------------
@pytest.fixture(scope="module")
def distilled(gemma, gemma_path, base_model, data_file, tmp_path_factory):
    """A cache decoder distilled (distill=1: the teacher's term alone) from a random plain decoder."""
    import torch

    from kvfork.train.trainer import Trainer

    folder = tmp_path_factory.mktemp("teacher")
    teacher = random_lora_gguf(gemma_path, folder / "teacher.gguf", rank=8, std=0.05, seed=5,
                               targets=("attn_q", "attn_v", "ffn_up"), meta={PREFILL_KEY: "adapter"})
    examples = load_examples(data_file, gemma)
    config = TrainConfig(mode="cache", steps=16, lr=1e-3, warmup=2, n_threads=1, seed=0, teacher=str(teacher),
                         distill=1.0)
    trainer = Trainer(copy.deepcopy(base_model), config)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".teacher." in n}
    with torch.no_grad():
        before = [float(trainer.train_loss(i, e)) for i, e in enumerate(examples)]
    result = trainer.train(examples, progress=False)
    with torch.no_grad():
        after = [float(trainer.train_loss(i, e)) for i, e in enumerate(examples)]
    return {"trainer": trainer, "teacher": teacher, "examples": examples, "before": before, "after": after,
            "frozen": frozen, "result": result}


def test_the_teacher_scores_replies_as_llama_cpp_serves_it(distilled, raw_llama):
    trainer, example = distilled["trainer"], distilled["examples"][0]
    top, logp = trainer._teacher_top_k(example)
    served = raw_llama.logits([(example.prompt + example.response[:-1], raw_llama.adapter(distilled["teacher"]))])
    served = served[-len(example.response):]
    bare = raw_llama.logits([(example.prompt + example.response[:-1], None)])[-len(example.response):]
    peak = served.max(-1, keepdims=True)
    ref = served - peak - np.log(np.exp(served - peak).sum(-1, keepdims=True))  # llama.cpp's log-probabilities
    assert (top[:, 0].numpy() == served.argmax(-1)).mean() >= 0.9
    gap = np.abs(logp[:, 0].numpy() - ref[np.arange(len(ref)), top[:, 0].numpy()]).max()
    # NOTE: llama.cpp's quantized matmuls against transformers' float32: the same tolerance as the export test
    effect = np.abs(served - bare).max()
    assert effect > 5 * gap, (effect, gap)  # the teacher is the file, and it changes the model


def test_distillation_moves_the_student_to_the_teacher_and_leaves_the_teacher_alone(distilled):
    assert np.mean(distilled["after"]) < 0.8 * np.mean(distilled["before"]), (distilled["before"], distilled["after"])
    trainer = distilled["trainer"]
    for name, param in trainer.model.named_parameters():
        if name in distilled["frozen"]:
            assert not param.requires_grad and bool((param == distilled["frozen"][name]).all()), name
    assert distilled["result"].tensors.keys() == trainer.lora_tensors().keys()  # the student's, not the teacher's
    assert distilled["result"].meta()["kvfork.train.distill"] == "1.0"


def test_a_cache_decoder_or_a_base_model_is_refused_as_teacher(trained, gemma_path, tmp_path):
    from kvfork.errors import InvalidModelFile
    from kvfork.train.gguf_lora import read_lora_gguf
    from kvfork.train.trainer import Trainer

    with pytest.raises(InvalidParameter, match="plain decoder"):
        Trainer(trained.trainer.base, TrainConfig(teacher=str(trained.path), distill=0.5, n_threads=1))
    with pytest.raises(InvalidModelFile, match="not a LoRA adapter"):
        read_lora_gguf(gemma_path)


def test_adapter_writer_refuses_bad_input(tmp_path):
    from kvfork.train.gguf_lora import gguf_tensor_name, write_lora_gguf

    assert gguf_tensor_name("qwen2", 24, "base_model.model.model.layers.3.self_attn.q_proj") == "blk.3.attn_q.weight"
    assert gguf_tensor_name("gemma3", 18, "model.layers.17.mlp.down_proj") == "blk.17.ffn_down.weight"
    a, b = np.zeros((4, 640), np.float32), np.zeros((1024, 4), np.float32)
    q = "model.layers.0.self_attn.q_proj"
    cases = [
        ("llama", {q: (a, b)}, "architectures"),
        ("gemma3", {q: (a, b.T)}, "same r"),
        ("gemma3", {q: (a, b * np.nan)}, "NaN"),
        ("gemma3", {"model.nope": (a, b)}, "no gemma3 GGUF tensor"),
        ("gemma3", {}, "at least one"),
    ]
    for arch, tensors, match in cases:
        with pytest.raises(InvalidParameter, match=match):
            write_lora_gguf(tmp_path / "x.gguf", arch=arch, n_layers=2, alpha=8, tensors=tensors)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# -- the command line --------------------------------------------------------------------------------
@pytest.mark.model  # loads gemma3-270m by its catalog name
def test_train_decoder_cli_end_to_end(data_file, tmp_path, capsys):
    lines = data_file.read_text().splitlines()[:3]
    small = tmp_path / "three.jsonl"
    small.write_text("\n".join(lines) + "\n")
    out, second = tmp_path / "cli.gguf", tmp_path / "second.gguf"
    argv = [
        "train-decoder",
        "--model",
        "gemma3-270m",
        "--chat-template",
        "gemma",
        "--data",
        str(small),
        "--out",
        str(out),
        "--data",
        str(small),
        "--out",
        str(second),
        "--steps",
        "2",
        "--threads",
        "1",
        "--rank",
        "4",
        "--mode",
        "plain",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(tmp_path / "third.gguf")]) == 2  # 2 --data, 3 --out
    assert "one --out per --data" in capsys.readouterr().err
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("steps 2 in") == 2 and "final loss" in printed
    assert str(out) in printed and str(second) in printed
    assert gguf.GGUFReader(second).fields[PREFILL_KEY].contents() == "adapter"
    fields = gguf.GGUFReader(out).fields
    assert fields[PREFILL_KEY].contents() == "adapter"
    assert fields["kvfork.train.rank"].contents() == "4"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_without_the_train_extra_says_what_to_install(data_file, tmp_path, monkeypatch, capsys):
    import kvfork.train.cli as train_cli

    monkeypatch.setattr(train_cli, "_TRAIN_PACKAGES", ("kvfork_no_such_package",))
    assert main(["train-decoder", "--data", str(data_file), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "pip install 'kvfork[train]'" in capsys.readouterr().err


# -- settings and data --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [
        {"mode": "prefix"},
        {"rank": 0},
        {"rank": 2.5},
        {"alpha": 0},
        {"dropout": 1.0},
        {"lr": 0},
        {"steps": -1},
        {"epochs": 0},
        {"grad_accum": 0},
        {"targets": ()},
        {"targets": "q_proj"},
        {"schedule": "linear"},
        {"n_threads": 0},
        {"max_prompt_tokens": 0},
        {"max_grad_norm": 0},
        {"distill": 0.5},
        {"teacher": "plain.gguf"},
        {"teacher": "plain.gguf", "distill": 1.5},
        {"own_tokens": 0},
        {"mode": "plain", "own_tokens": 4},
    ],
)
def test_bad_config_values_raise(fields):
    with pytest.raises(InvalidParameter):
        TrainConfig(**fields)


def test_config_prefill_and_meta():
    assert TrainConfig(mode="cache").prefill == "base" and TrainConfig(mode="plain").prefill == "adapter"
    meta = TrainConfig(targets=("q_proj", "v_proj")).as_meta()
    assert meta["kvfork.train.targets"] == "q_proj,v_proj" and meta["kvfork.train.mode"] == "cache"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"document": "d", "instruction": "i"}', "missing response"),
        ('{"document": "d", "instruction": 3, "response": "r"}', "'instruction' must be a string"),
        ('{"document": "d", "instruction": "i", "response": " "}', "'response' is empty"),
        ('{"document": "d", "instruction": "i", "response": "r", "system": 1}', "'system' must be"),
    ],
)
def test_bad_data_lines_name_the_line(gemma, tmp_path, line, match):
    good = json.dumps({"document": "d", "instruction": "i", "response": "r"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(InvalidParameter, match=f"bad.jsonl:3: {match}"):
        load_examples(path, gemma)


def test_missing_or_empty_data_file(gemma, tmp_path):
    with pytest.raises(KvforkError, match="cannot read"):
        load_examples(tmp_path / "absent.jsonl", gemma)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidParameter, match="no examples"):
        load_examples(tmp_path / "empty.jsonl", gemma)
