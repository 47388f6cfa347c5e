"""Prompt embeddings cached per prompt: they depend only on the text, never on the images being scored."""

from __future__ import annotations

from collections.abc import Callable

import torch


class PromptCache:
    """Maps (prompt, device, dtype) to an embedding computed once, without autograd, by ``encode``."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]) -> None:
        self.encode = encode
        self._store: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __call__(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Embeddings [len(prompts), D] on ``device``, encoding only the prompts not seen before."""
        missing = [p for p in dict.fromkeys(prompts) if (p, device, dtype) not in self._store]
        if missing:
            with torch.no_grad():
                features = self.encode(missing)
            for prompt, feature in zip(missing, features, strict=True):
                self._store[(prompt, device, dtype)] = feature
        return torch.stack([self._store[(p, device, dtype)] for p in prompts])
