"""kvcache: llama.cpp sequence-state blobs as numpy arrays (codec), and moving cached keys to new positions (RoPE).

Works on bytes: nothing here imports llama_cpp; RopeSpec.from_model reads a loaded engine model.
"""

from kvfork.kvcache.codec import SEQ_STATE_MAGIC, decode, encode
from kvfork.kvcache.ggml_types import GgmlType
from kvfork.kvcache.hadamard import apply_rotation, k_rotation_size, v_rotation_size
from kvfork.kvcache.rope import RopeParams, RopeSpec, RopeType, rerotate, rotate_keys
from kvfork.kvcache.state import CacheState, KvTensor, SeqState

__all__ = [
    "SEQ_STATE_MAGIC",
    "decode",
    "encode",
    "GgmlType",
    "SeqState",
    "CacheState",
    "KvTensor",
    "RopeType",
    "RopeParams",
    "RopeSpec",
    "rerotate",
    "rotate_keys",
    "apply_rotation",
    "k_rotation_size",
    "v_rotation_size",
]
