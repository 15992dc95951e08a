"""Frozen configuration dataclasses, validated when built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from kvfork.errors import InvalidParameter

__all__ = ["EXACT_HELP", "EngineConfig", "ServerConfig", "StoreConfig", "check_url", "default_threads"]

# NOTE: one wording for every command that builds an engine (run, demo, pipeline, snapshot, serve)
EXACT_HELP = (
    "forks and restores give exactly the tokens of a from-scratch run (q8_0 KV cache, batch-invariant"
    " kernels: llama.cpp's speed with `kvfork build`, ~2x slower prefill without); default: llama.cpp's"
    " fastest settings, equal up to rounding"
)

FlashAttn = Literal["auto", "on", "off"]
KvType = Literal["q8_0", "f16", "f32"]


def default_threads() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine sizes and runs its one llama context.

    n_ctx is the number of KV cells shared by every snapshot and branch (a unified cache): a
    3,500-token prefix forked to 8 branches of 200 tokens needs about 3,500 + 8*200 cells, not 8*3,700.

    Two modes (docs/exactness.md):
    - fast (exact=False, the default): llama.cpp's fastest settings for this machine: its default f16 KV
      cache and ggml's tiled matmul, with flash attention *off* and weights *not* repacked, two
      measured departures from llama.cpp's defaults (bench/arms.py --compare-settings, a ~3,500-token
      prompt, 2 threads; docs/benchmarks.md has the figures):
      NOTE: ggml's CPU flash-attention kernel runs each query as its own pass over the visible cells,
      so every branch of a fan-out reads the shared prefix again; without it, attention is two matmuls
      that read each cell once for all the rows of a batch. Measured: a decode step of 1 / 4 / 8
      branches 59 / 159 / 316 ms against 75 / 226 / 452 ms with flash attention (medians of 3),
      prefill the same within noise (67 vs 69 tok/s). A quantized kv_type needs flash attention and keeps "auto"; on
      a GPU build pass flash_attn="auto" (llama.cpp's default there), which this CPU figure says
      nothing about.
      NOTE: repacked Q4_K weights (llama.cpp's default) run a decode of 2-3 rows as 2-3 single-row
      passes over the weights, and bypass the tiled K-quant matmul that beats them in prefill on AVX2
      CPUs: measured prefill 73.8 vs 68.2 tok/s, a decode step of 2 / 4 / 8 branches 122 / 213 / 383 vs
      142 / 236 / 442 ms; one branch alone 72 vs 64 ms (flash attention on in both). With flash
      attention off the comparison was undecided in one run (docs/benchmarks.md); this stays until a
      longer run settles it.
      A forked branch computes what a from-scratch run computes up to floating-point rounding (the
      kernels llama.cpp picks depend on the batch and on where cells sit), so long greedy outputs can
      part ways at near-ties.
    - exact (exact=True): a forked or restored branch produces exactly the tokens of a from-scratch
      run. NOTE: it takes q8_0 KV + flash attention "on" and no repacked weights (their Q4_K matmul
      differs between one and several rows). On kvfork's patched llama.cpp (`kvfork build`,
      docs/kernels-patch.md) every batch shape and cell layout then rounds alike at llama.cpp's default
      speed. On a stock llama-cpp-python it falls back to the one attention path that rounds the same for
      any batch shape there and ggml's tiled K-quant matmul off (a process-wide switch, see
      engine/llama.py), which prefills about 2x slower, and a fork is never left fewer than 16 tokens to
      prefill (prefix_cache.MIN_SUFFIX). Either way the scheduler frees finished branches' cells only
      between turns (cell order still counts).
    kv_type, flash_attn, repack and park_idle left None take the mode's values; exact mode refuses other
    values.

    park_idle (fast mode): a snapshot the caller holds but is not using moves to host RAM while other
    work runs, and comes back (a restore, ~0.01 s for 3,500 tokens) when it is next used. NOTE:
    llama.cpp's unified cache attends over every cell up to the highest one in use, masked per
    sequence, so without flash attention an idle snapshot's cells cost every token computed beside them:
    with 5,300 idle cells a 570-token prefill took 2.4x and a decode step 1.6x as long as in an empty
    context (default model, 2 threads), where llama.cpp's one-sequence context pays nothing. With a store,
    the prefix cache's own idle entries (composed prompts' heads) move to it the same way (bench/idle_heads.py).

    max_running bounds the sequences that run at once, generating or prefilling a prompt; the rest wait,
    turns that generate before new prompts (Scheduler._admit). NOTE: past a few branches a CPU decode step
    grows with its rows (each row attends over every live cell) while the tokens/s of all branches stay
    flat: measured by bench/decode_batch.py (default model, 2 threads, 32 tokens per branch over a
    1,300-token prefix, medians of 3): 1 / 4 / 16 / 64 branches 37 / 60 / 49 / 64 tokens/s in all,
    0.03 / 0.07 / 0.33 / 1.0 s a step. So under overload an unbounded batch only slows every request
    until none finishes; 16 keeps a step near 0.3 s and still decodes a 16-agent fan-out in one batch.
    """

    n_ctx: int = 8192
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 32
    max_running: int = 16  # sequences running at once; more wait their turn (see the NOTE above)
    n_threads: int = field(default_factory=default_threads)
    exact: bool = False
    flash_attn: FlashAttn | None = None  # None: "off" (fast; "auto" for a quantized kv_type) / "on" (exact)
    kv_type: KvType | None = None  # None: "f16" (fast) / "q8_0" (exact)
    repack: bool | None = None  # llama.cpp's repacked weight layouts ("extra buffer types"); None: False
    park_idle: bool | None = None  # idle snapshots wait in host RAM while others run; None: True (fast) / False (exact)
    chat_template: str | None = None  # a template (or llama.cpp template name) overriding the GGUF's own
    verbose: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise InvalidParameter(f"n_ctx must be at least 16, got {self.n_ctx}")
        if not 1 <= self.n_ubatch <= self.n_batch:
            raise InvalidParameter(
                f"need 1 <= n_ubatch <= n_batch, got n_ubatch={self.n_ubatch}, n_batch={self.n_batch}"
            )
        # NOTE: llama.cpp caps sequence ids at LLAMA_MAX_SEQ (256); one id is kept for each live snapshot.
        if not 2 <= self.n_seq_max <= 256:
            raise InvalidParameter(f"n_seq_max must be in [2, 256], got {self.n_seq_max}")
        if not isinstance(self.max_running, int) or self.max_running < 1:
            raise InvalidParameter(f"max_running must be a positive integer, got {self.max_running!r}")
        if self.n_threads < 1:
            raise InvalidParameter(f"n_threads must be >= 1, got {self.n_threads}")
        if not isinstance(self.exact, bool):
            raise InvalidParameter(f"exact must be True or False, got {self.exact!r}")
        mode = _EXACT if self.exact else _FAST
        if not self.exact and self.kv_type not in (None, "f16", "f32"):
            mode = {**mode, "flash_attn": "auto"}  # a quantized V cache needs flash attention
        for name, value in mode.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
            elif self.exact and getattr(self, name) != value:
                raise InvalidParameter(
                    f"exact=True needs {name}={value!r} (got {getattr(self, name)!r}): it is what makes a fork's"
                    f" arithmetic match a from-scratch run; drop {name} or use exact=False"
                )
        if self.kv_type not in ("q8_0", "f16", "f32"):
            raise InvalidParameter(f"kv_type must be 'q8_0', 'f16' or 'f32', got {self.kv_type!r}")
        if self.flash_attn not in ("auto", "on", "off"):
            raise InvalidParameter(f"flash_attn must be 'auto', 'on' or 'off', got {self.flash_attn!r}")
        if self.kv_type == "q8_0" and self.flash_attn == "off":
            raise InvalidParameter("a q8_0 KV cache needs flash attention (flash_attn='on' or 'auto')")
        if not isinstance(self.repack, bool):
            raise InvalidParameter(f"repack must be True or False, got {self.repack!r}")
        if not isinstance(self.park_idle, bool):
            raise InvalidParameter(f"park_idle must be True or False, got {self.park_idle!r}")


# NOTE: fast = llama.cpp's context defaults (llama_context_default_params) without flash attention or
# repacked weights (both measured slower on CPUs, see above).
# park_idle (runtime/parking.py): exact mode keeps snapshots where they are, since a restored one's cells
# move in the cache, and cell order is what exact mode's attention sums depend on (docs/exactness.md).
_FAST: dict[str, object] = {"kv_type": "f16", "flash_attn": "off", "repack": False, "park_idle": True}
_EXACT: dict[str, object] = {"kv_type": "q8_0", "flash_attn": "on", "repack": False, "park_idle": False}


@dataclass(frozen=True)
class StoreConfig:
    """Budgets and policies of a SnapshotStore (host RAM tier, optional disk folder tier, optional shared tier).

    NOTE: block_size trades lookup cost against match granularity: a stored entry is found through
    its full blocks, so entries shorter than one block are never matched, and hashing a 32k-token
    request costs 1,000 sha256 calls at 32 (under a millisecond).

    url: the shared tier every replica reads (store/shared.py), an fsspec URL such as
    file:///mnt/nfs/kvfork or s3://bucket/kvfork; storage_options go to fsspec as is (for an S3
    endpoint of your own: {"client_kwargs": {"endpoint_url": "http://host:9000"}}; or set
    AWS_ENDPOINT_URL / FSSPEC_S3_* in the environment). It has no budget: replicas never evict it.
    """

    ram_bytes: int = 1 << 30
    disk_bytes: int = 16 << 30
    block_size: int = 32
    min_tokens: int = 32  # a shorter shared prefix is not worth a restore
    write_through: bool = True  # write every new entry to disk at once (other processes see it)
    stale_tmp_s: float = 3600.0  # a temp file this old is an abandoned write, whoever wrote it
    url: str | None = None  # shared tier: file:///... or s3://... (None: none)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec filesystem arguments
    shared_refresh_s: float = 2.0  # list the shared tier at most this often (a new entry waits this long)
    shared_async: bool = True  # write to the shared tier on a writer thread, off the caller's path

    def __post_init__(self) -> None:
        if self.ram_bytes < 0 or self.disk_bytes < 0:
            raise InvalidParameter(f"byte budgets must be >= 0, got {self.ram_bytes} (RAM), {self.disk_bytes} (disk)")
        if self.url is not None:
            check_url(self.url)
        if self.shared_refresh_s < 0:
            raise InvalidParameter(f"shared_refresh_s must be >= 0, got {self.shared_refresh_s}")
        if not 1 <= self.block_size <= 4096:
            raise InvalidParameter(f"block_size must be in [1, 4096], got {self.block_size}")
        if self.min_tokens < 1:
            raise InvalidParameter(f"min_tokens must be >= 1, got {self.min_tokens}")


@dataclass(frozen=True)
class ServerConfig:
    """Limits and policies of `kvfork serve` (the OpenAI-compatible server).

    NOTE: host defaults to loopback: the server runs arbitrary prompts on this machine's CPU, so
    exposing it is an explicit choice (--host 0.0.0.0, ideally with --api-key).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # the id /v1/models lists; None: the model file's stem
    max_body_bytes: int = 4 << 20
    max_n: int = 8
    max_tokens: int = 2048  # cap on max_tokens per choice
    max_queued: int = 64  # requests accepted but not finished; more get 429
    # NOTE: None = the engine's sequence ids less max_running, at least 48 (Dispatcher.live_cap; 48 for
    # `kvfork serve`'s 64 and 16). Idle prefixes give way (LRU) whenever a request needs their cells or ids.
    # Issue 21's closed loops at 64 sessions reused 82% of prompt tokens with 48 kept, 87% with 128
    live_prefixes: int | None = None  # idle prefilled prefixes kept in the cache for later requests (LRU)
    min_shared_tokens: int = 16  # a shorter common prefix is not worth its own prefill node
    coalesce_s: float = 0.02  # how long an idle loop waits for more requests, to plan those arriving together at once
    # chat requests' reuse mode unless they ask for another (see kvfork.reuse; opt-in)
    reuse: Literal["exact", "shift", "kvcomm", "blend"] = "exact"
    reuse_min_tokens: int = 64  # a message this long becomes a segment other requests may reuse
    reuse_cache_mb: int = 256  # host memory for segments kept for reuse (decoded KV), LRU

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidParameter(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise InvalidParameter("api_key must be non-empty (or None for no authentication)")
        for name in ("max_body_bytes", "max_n", "max_tokens", "max_queued", "min_shared_tokens"):
            if getattr(self, name) < 1:
                raise InvalidParameter(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.live_prefixes is not None and self.live_prefixes < 0) or not 0.0 <= self.coalesce_s <= 1.0:
            raise InvalidParameter("live_prefixes must be >= 0 and coalesce_s in [0, 1]")
        if self.reuse not in ("exact", "shift", "kvcomm", "blend"):
            raise InvalidParameter(f"reuse must be exact, shift, kvcomm or blend; got {self.reuse!r}")
        if self.reuse_min_tokens < 1 or self.reuse_cache_mb < 0:
            raise InvalidParameter("reuse_min_tokens must be >= 1 and reuse_cache_mb >= 0")


def check_url(url: str) -> str:
    """Raise InvalidParameter unless `url` names a location fsspec can open here; return its protocol."""
    import fsspec

    if not isinstance(url, str) or "://" not in url:
        raise InvalidParameter(
            f"a shared snapshot URL needs a scheme, like file:///mnt/nfs/kvfork or s3://bucket/kvfork; got {url!r}"
        )
    if "::" in url:
        raise InvalidParameter(f"chained fsspec URLs (a::b) are not supported for the shared tier: {url!r}")
    protocol = url.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError as exc:
        raise InvalidParameter(f"fsspec does not know the scheme {protocol!r} of {url!r}") from exc
    except ImportError as exc:
        extra = " (pip install 'kvfork[s3]')" if protocol in ("s3", "s3a") else ""
        raise InvalidParameter(f"the scheme {protocol!r} needs a package that is not installed{extra}: {exc}") from exc
    return protocol
