"""Adapter and Adapters: LoRA decoders loaded by name, and which of a branch's tokens each one computes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kvfork.engine.llama import LlamaModel, LoraAdapter
from kvfork.errors import InvalidParameter, ModelNotFound

__all__ = ["Adapter", "Adapters", "OWN_TOKENS_KEY", "PREFILL_KEY"]

PREFILL_KEY = "kvfork.decoder.prefill"  # GGUF metadata `kvfork train-decoder` writes: "base" or "adapter"
OWN_TOKENS_KEY = "kvfork.decoder.own_tokens"  # and for "base": how many of a prompt's last tokens it computes
_PREFILLS = ("base", "adapter")


@dataclass(frozen=True, eq=False)
class Adapter:
    """One LoRA decoder: a name, its GGUF, the scale it is applied with, and who computes its prompts.

    prefill "base" (PrefillShare): the base model, adapter off, computes the prompt; the adapter
    computes the prompt's last `own_tokens` tokens (1 unless the file says otherwise: `kvfork
    train-decoder --own-tokens`) and every generated token. Its branches fork any base snapshot:
    that is exact for a decoder trained on base KV (`kvfork train-decoder --mode cache`, which
    writes this in the GGUF). prefill "adapter": the adapter computes every token, as the fine-tuned
    model would alone; its branches cannot read base KV. Adapters from elsewhere default to
    "adapter"; loading one with prefill="base" opts into reading base KV it was not trained on.
    """

    name: str
    path: Path
    scale: float
    prefill: str
    lora: LoraAdapter = field(repr=False)
    own_tokens: int = 1

    def first_own(self, prompt_end: int, generating: bool) -> int:
        """Index of the first token of a turn this adapter computes (the bare base computes those before).

        `prompt_end`: where the turn's prompt ends; `generating`: the turn samples tokens after it.
        """
        if self.prefill == "adapter":
            return 0
        return max(0, prompt_end - self.own_tokens) if generating else prompt_end


class Adapters:
    """The adapters an engine has loaded, by name. Names are what the API calls "base+name"."""

    def __init__(self, model: LlamaModel) -> None:
        self._model = model
        self._by_name: dict[str, Adapter] = {}

    def load(
        self, name: str, path: str | os.PathLike[str], *, scale: float = 1.0, prefill: str | None = None
    ) -> Adapter:
        """Load a LoRA GGUF under `name`; prefill None reads it from the file (else "adapter")."""
        if not isinstance(name, str) or not name or "+" in name or name != name.strip():
            raise InvalidParameter(f"adapter name must be a non-empty string without '+' or spaces; got {name!r}")
        if name in self._by_name:
            raise InvalidParameter(f"an adapter named {name!r} is already loaded")
        if not (isinstance(scale, (int, float)) and 0.0 < float(scale) <= 4.0):
            raise InvalidParameter(f"adapter scale must be in (0, 4]; got {scale!r}")
        if prefill is not None and prefill not in _PREFILLS:
            raise InvalidParameter(f"prefill must be one of {_PREFILLS}; got {prefill!r}")
        file = Path(path).expanduser()
        if not file.is_file():
            raise ModelNotFound(f"no adapter file at {file}")
        lora = LoraAdapter(self._model, file)
        written = lora.meta(PREFILL_KEY)
        chosen = prefill or (written if written in _PREFILLS else "adapter")
        own = lora.meta(OWN_TOKENS_KEY) or "1"
        if not own.isdigit() or int(own) < 1:
            lora.close()
            raise InvalidParameter(f"adapter {file} has {OWN_TOKENS_KEY} = {own!r}; it must be an integer >= 1")
        adapter = Adapter(name=name, path=file, scale=float(scale), prefill=chosen, lora=lora, own_tokens=int(own))
        self._by_name[name] = adapter
        return adapter

    def get(self, name: str | Adapter | None) -> Adapter | None:
        """The adapter called `name` (None: the bare base model); unknown names are a ModelNotFound."""
        if name is None or isinstance(name, Adapter):
            if isinstance(name, Adapter) and self._by_name.get(name.name) is not name:
                raise ModelNotFound(f"adapter {name.name!r} is not loaded in this engine")
            return name
        adapter = self._by_name.get(name)
        if adapter is None:
            known = ", ".join(sorted(self._by_name)) or "none loaded"
            raise ModelNotFound(f"unknown adapter {name!r} (loaded: {known})")
        return adapter

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def close(self) -> None:
        for adapter in self._by_name.values():
            adapter.lora.close()
        self._by_name.clear()
