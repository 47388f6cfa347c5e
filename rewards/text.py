"""Prompts as tensors: processors that turn prompts into named tensors in Python without running a model
(tokenisation, caption parsing), serialisable so that an exported graph can rebuild them, and a per-prompt cache
of what the tensor side computes from the prompts alone (text embeddings never depend on the images scored)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

PROCESSORS: dict[str, type[PromptProcessor]] = {}
"""Processor classes by ``kind``, filled as they are defined; :func:`processor_from_json` reads only these."""


class PromptProcessor:
    """Turns prompts into named tensors, one row per prompt, without a model: the Python side of a prompt reward.

    Subclasses set ``kind`` (registered on definition) and implement ``__call__``, :meth:`to_json` and
    :meth:`from_json`; ``example`` is a prompt they accept (used to trace exported graphs)."""

    kind: ClassVar[str] = ""
    example: ClassVar[str] = "a photo of a cat"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            PROCESSORS[cls.kind] = cls

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """Everything needed to rebuild this processor, as JSON-ready data (without ``kind``)."""
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptProcessor:
        raise NotImplementedError


def processor_to_json(processor: PromptProcessor) -> dict[str, Any]:
    """``processor`` as JSON-ready data naming its kind."""
    return {"kind": processor.kind, **processor.to_json()}


def processor_from_json(data: dict[str, Any]) -> PromptProcessor:
    """Rebuild a processor written by :func:`processor_to_json` (known kinds only: data never names code to run)."""
    kind = data.get("kind")
    if kind not in PROCESSORS:
        raise ValueError(f"unknown prompt processor kind {kind!r}; known: {', '.join(sorted(PROCESSORS))}")
    return PROCESSORS[kind].from_json({k: v for k, v in data.items() if k != "kind"})


def prompt_tensors(processors: Mapping[str, PromptProcessor], prompts: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of every processor, each name prefixed with its processor's key (``""`` for a single reward,
    ``"member/"`` for a member of a mix)."""
    return {prefix + name: t for prefix, processor in processors.items() for name, t in processor(prompts).items()}


class TokenizerPrompts(PromptProcessor):
    """A Hugging Face ``tokenizers.Tokenizer`` padding and truncating to ``max_length``; outputs ``names`` among
    ``input_ids`` and ``attention_mask``. It serialises as the tokenizer's JSON (padding and truncation included),
    so both scoring paths run the same tokenizer. Build with :meth:`of` from a transformers tokenizer."""

    kind = "tokenizer"
    OUTPUTS = ("input_ids", "attention_mask")

    def __init__(self, tokenizer: Any, names: tuple[str, ...]) -> None:
        unknown = set(names) - set(self.OUTPUTS)
        if unknown or tokenizer.padding is None or tokenizer.truncation is None:
            raise ValueError(f"a tokenizer with padding and truncation, outputs among {self.OUTPUTS}; got {names}")
        self.tokenizer, self.names = tokenizer, tuple(names)

    @classmethod
    def of(cls, tokenizer: Any, max_length: int, names: tuple[str, ...] = ("input_ids",)) -> TokenizerPrompts:
        """From a transformers tokenizer (``TokenizersBackend``): its backend tokenizer, padded with its pad token
        to exactly ``max_length`` and truncated to it, as ``tokenizer(..., padding="max_length", truncation=True)``."""
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: enabling padding mutates it
        backend.enable_truncation(max_length)
        backend.enable_padding(length=max_length, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
        return cls(backend, names)

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        encodings = self.tokenizer.encode_batch(prompts)
        return {name: torch.tensor([getattr(e, name.removeprefix("input_")) for e in encodings]) for name in self.names}

    def to_json(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.to_str(), "names": list(self.names)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenizerPrompts:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(data["tokenizer"]), tuple(data["names"]))


class PromptCache:
    """Maps (prompt, device, dtype, autocast dtype) to the rows that ``encode(prompts, device)`` computes once,
    without autograd, for each named tensor. The autocast state is part of the key: rows encoded under bf16
    autocast are never reused in float32 or fp16 scoring."""

    def __init__(self, encode: Callable[[list[str], torch.device], dict[str, torch.Tensor]]) -> None:
        self.encode = encode
        self._store: dict[tuple[str, torch.device, torch.dtype, torch.dtype | None], dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __call__(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors ``[len(prompts), ...]`` on ``device``, encoding only the prompts not seen before."""
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        keys = {p: (p, device, dtype, autocast) for p in prompts}
        missing = [p for p in keys if keys[p] not in self._store]
        if missing:
            with torch.no_grad():
                encoded = self.encode(missing, device)
            for i, prompt in enumerate(missing):
                self._store[keys[prompt]] = {name: t[i] for name, t in encoded.items()}
        rows = [self._store[keys[p]] for p in prompts]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
