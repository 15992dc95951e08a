"""The LoRA adapter file llama.cpp loads: GGUF written with numpy + gguf only (no torch).

Keys and tensors are exactly what llama.cpp's `convert_lora_to_gguf.py` writes: `general.type = "adapter"`,
`general.architecture` = the base's, `adapter.type = "lora"`, `adapter.lora.alpha` (f32), and per adapted
base tensor `<gguf name>.lora_a` (numpy shape (r, in)) and `<gguf name>.lora_b` (numpy shape (out, r)).
llama.cpp checks lora_a's ne[0] == the base's in-features and lora_b's ne[1] == its out-features
(`llama-adapter.cpp`), and applies `scale * alpha / r * B @ A`, peft's scaling, r being the stored rank.

The matrices are stored as q8_0, the rank padded with zeros to whole 32-value blocks and alpha scaled to
keep alpha / r (see `_q8_0_pairs`); float32 where a dimension does not fit q8_0 blocks.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from kvfork.engine.adapters import PREFILL_KEY  # "base": trained on base-model prompt KV; "adapter": plain LoRA
from kvfork.errors import InvalidModelFile, InvalidParameter
from kvfork.train.gguf_header import LeanGGUFReader

__all__ = [
    "SUPPORTED_ARCHS",
    "PREFILL_KEY",
    "gguf_tensor_name",
    "write_lora_gguf",
    "write_lora_gguf_tensors",
    "random_lora_gguf",
    "LoraFile",
    "read_lora_gguf",
]

# NOTE: both use NEOX RoPE, so their converters store q/k rows as transformers has them (no permutation);
# llama-style architectures permute q/k rows in conversion and would need the same for lora_b: refused.
SUPPORTED_ARCHS: tuple[str, ...] = ("qwen2", "gemma3")

_PEFT_PREFIX = "base_model.model."


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    if arch not in SUPPORTED_ARCHS:
        raise InvalidParameter(
            f"LoRA export supports the architectures {', '.join(SUPPORTED_ARCHS)}; got {arch!r}"
            " (others permute q/k rows in conversion, which this writer does not reproduce)"
        )
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def gguf_tensor_name(arch: str, n_layers: int, module: str) -> str:
    """The base GGUF's weight name for a transformers module name (`model.layers.3.self_attn.q_proj` ->
    `blk.3.attn_q.weight`), by gguf's own TensorNameMap; peft's `base_model.model.` prefix is accepted."""
    if module.startswith(_PEFT_PREFIX):
        module = module[len(_PEFT_PREFIX) :]
    name = gguf.get_tensor_name_map(_arch_enum(arch), n_layers).get_name(module + ".weight", try_suffixes=(".weight",))
    if name is None:
        raise InvalidParameter(f"no {arch} GGUF tensor corresponds to the module {module!r}")
    return name


def write_lora_gguf(
    path: str | os.PathLike[str],
    *,
    arch: str,
    n_layers: int,
    alpha: float,
    tensors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    meta: Mapping[str, str] | None = None,
) -> Path:
    """Write a LoRA adapter keyed by transformers module name: {module: (lora_A (r, in), lora_B (out, r))}.

    Atomic: a temp file in the same folder, then os.replace. Returns the path written.
    """
    named = {gguf_tensor_name(arch, n_layers, module): ab for module, ab in tensors.items()}
    if len(named) != len(tensors):
        raise InvalidParameter("two modules map to the same GGUF tensor")
    return write_lora_gguf_tensors(path, arch=arch, alpha=alpha, tensors=named, meta=meta)


def write_lora_gguf_tensors(
    path: str | os.PathLike[str],
    *,
    arch: str,
    alpha: float,
    tensors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    meta: Mapping[str, str] | None = None,
) -> Path:
    """Write a LoRA adapter keyed by the base GGUF's tensor names (`blk.3.attn_q.weight`)."""
    _arch_enum(arch)
    if not tensors:
        raise InvalidParameter("a LoRA adapter needs at least one tensor pair")
    if not alpha > 0:
        raise InvalidParameter(f"alpha must be > 0, got {alpha}")
    path = Path(path)
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    pairs = {name: _checked(name, a, b) for name, (a, b) in tensors.items()}
    quantized = _q8_0_pairs(pairs, alpha)
    if quantized is not None:
        pairs, alpha = quantized
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for key, value in (meta or {}).items():
        writer.add_string(key, str(value))
    for name, (a, b) in pairs.items():
        for suffix, matrix in ((".lora_a", a), (".lora_b", b)):
            if quantized is None:
                writer.add_tensor(name + suffix, matrix)
            else:
                writer.add_tensor(name + suffix, gguf.quants.quantize(matrix, _Q8_0), raw_dtype=_Q8_0)
    # NOTE: the temp file sits beside the target so os.replace is an atomic rename; opened by the writer
    # ("wb"), it gets the umask's usual mode, not mkstemp's 0600.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


_Q8_0 = gguf.GGMLQuantizationType.Q8_0
_Q8_0_BLOCK = 32


def _q8_0_pairs(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], alpha: float
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float] | None:
    """The pairs with their rank zero-padded to whole q8_0 blocks, and the alpha that keeps alpha / rank;
    None when some in-features are not whole blocks or the ranks differ (they are then stored as float32).

    NOTE: ggml multiplies float32 matrices with llamafile's tinyBLAS for two rows or more and with vec_dot
    for one, and the two round differently: a decoder's logits would depend on how many branches share
    its adapter in a decode (measured: 5 branches of one adapter differed from a from-scratch run by up to
    1e-5 in a log-probability). Its q8_0 kernels give the same result for any batch (bit-identical there).
    Zero padding is exact: zeros quantize to zeros and add nothing.
    """
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1 or any(a.shape[1] % _Q8_0_BLOCK for a, _ in pairs.values()):
        return None
    rank = ranks.pop()
    padded = -(-rank // _Q8_0_BLOCK) * _Q8_0_BLOCK
    out = {}
    for name, (a, b) in pairs.items():
        a = np.concatenate([a, np.zeros((padded - rank, a.shape[1]), np.float32)])
        b = np.concatenate([b, np.zeros((b.shape[0], padded - rank), np.float32)], axis=1)
        out[name] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return out, alpha * padded / rank


def _checked(name: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise InvalidParameter(
            f"{name}: lora_a must be (r, in) and lora_b (out, r) with the same r; got {a.shape} and {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InvalidParameter(f"{name}: the LoRA weights hold NaN or inf")
    return a, b


def random_lora_gguf(
    base_gguf_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Iterable[str] = ("attn_q", "attn_v"),
    std: float = 0.02,
    seed: int = 0,
    meta: Mapping[str, str] | None = None,
) -> Path:
    """A random adapter for a base GGUF: every layer's `targets` (GGUF names, e.g. "attn_q", "ffn_up")
    get lora_a and lora_b drawn from N(0, std^2) (both nonzero, so it changes the output).

    For tests that need a real adapter file without torch: shapes come from the base file's header.
    """
    if rank < 1:
        raise InvalidParameter(f"rank must be >= 1, got {rank}")
    reader = _reader(base_gguf_path)
    arch = str(reader.field_value("general.architecture"))
    wanted = tuple(targets)
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in wanted:
            n_in, n_out = int(t.shape[0]), int(t.shape[1])  # NOTE: GGUF shapes are in ggml order (ne[0] first)
            a = rng.normal(0.0, std, (rank, n_in)).astype(np.float32)
            b = rng.normal(0.0, std, (n_out, rank)).astype(np.float32)
            tensors[t.name] = (a, b)
    if not tensors:
        raise InvalidParameter(f"the base model has no layer tensors named {', '.join(wanted)}")
    return write_lora_gguf_tensors(out_path, arch=arch, alpha=alpha, tensors=tensors, meta=meta)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA adapter GGUF read back: alpha as stored, the pairs by the base GGUF's tensor names
    (`blk.3.attn_q.weight`: (lora_a (r, in), lora_b (out, r)), float32; the rank as stored, zero-padded
    where the writer padded it: alpha / r is what it was trained with), and its metadata strings."""

    arch: str
    alpha: float
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    meta: dict[str, str]

    @property
    def rank(self) -> int:
        return next(iter(self.tensors.values()))[0].shape[0]


def read_lora_gguf(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA adapter GGUF (this writer's, or llama.cpp's convert_lora_to_gguf.py's); q8_0 and f16
    matrices are dequantized. Raises InvalidModelFile for a file that is not a LoRA adapter."""
    reader = _reader(path)
    if reader.field_value(gguf.Keys.General.TYPE) != gguf.GGUFType.ADAPTER or \
            reader.field_value(gguf.Keys.Adapter.TYPE) != "lora":
        raise InvalidModelFile(f"{path} is not a LoRA adapter GGUF (general.type adapter, adapter.type lora)")
    alpha = reader.field_value(gguf.Keys.Adapter.LORA_ALPHA)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        name, _, half = t.name.rpartition(".")
        if half in ("lora_a", "lora_b"):
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            halves.setdefault(name, {})[half] = data
    pairs = {name: (h["lora_a"], h["lora_b"]) for name, h in halves.items() if len(h) == 2}
    if not pairs or len(pairs) != len(halves):
        raise InvalidModelFile(f"{path}: no complete lora_a / lora_b pairs")
    meta = {f.name: str(f.contents()) for f in reader.fields.values()
            if f.name.startswith("kvfork.") and isinstance(f.contents(), str)}
    return LoraFile(arch=str(reader.field_value("general.architecture")),
                    alpha=float(alpha) if alpha is not None else float(next(iter(pairs.values()))[0].shape[0]),
                    tensors={n: _checked(n, a, b) for n, (a, b) in pairs.items()}, meta=meta)


def _reader(path: str | os.PathLike[str]) -> LeanGGUFReader:
    try:
        return LeanGGUFReader(path)
    except (OSError, ValueError) as exc:
        raise InvalidModelFile(f"cannot read {path} as GGUF: {exc}") from exc
