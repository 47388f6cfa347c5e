"""The reward contract: a frozen module mapping images in [0, 1] (plus prompts) to one score per image."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
from torch import nn

from rewards.text import PromptCache, PromptProcessor

if TYPE_CHECKING:
    from rewards.combine import CombinedReward

Prompts = str | Sequence[str] | None

RANGE_TOLERANCE = 1e-3
"""How far outside [0, 1] pixel values may stray (rounding) before an input is rejected."""


class Reward(nn.Module):
    """Base class of every reward.

    Contract:
      * ``reward(images, prompts=None) -> Tensor[B]`` (float32), higher is better;
      * ``images``: float NCHW RGB in [0, 1], any height and width, on the reward's device, may require grad;
      * all preprocessing happens inside, differentiably; parameters are frozen and the module stays in eval
        mode, so gradients flow to the images only.

    Subclasses implement :meth:`score` and set the metadata below. Inputs are validated once in
    :meth:`forward`; set ``check_inputs = False`` on an instance to skip the checks (they synchronise with the
    device once per call).

    Prompt rewards split scoring in two instead, so that it exports to ONNX (``rewards.onnx``) with one code path:
    ``prompt_processor`` turns prompts into tensors in Python without a model (token ids, parsed captions), and
    tensor code does the rest: :meth:`encode_prompts` (what depends on the prompts alone, e.g. a text encoder) and
    :meth:`score_encoded`. The torch path caches ``encode_prompts``' rows per prompt (``prompt_cache``); an
    exported graph runs both from the processor's tensors (:meth:`compute_inputs`).
    """

    name: str = "reward"
    needs_prompts: bool = False
    input_size: int | None = None
    """Side of the square input the underlying model sees after preprocessing; ``None`` for any size."""
    typical_range: tuple[float, float] = (0.0, 1.0)
    """Scores usually seen on Stable Diffusion 1.x samples (documented in the model card)."""
    normalization: tuple[float, float] = (0.0, 1.0)
    """Default ``(mean, std)`` used by ``combine(..., normalize=True)`` to put rewards on a common scale."""
    check_inputs: bool = True
    differentiable: bool = True
    """Whether the scores carry a gradient to the images. DRaFT-family methods need one; RL methods (DDPO, GRPO)
    take any reward as a black box. A non-differentiable reward (a JPEG size, a hard count) scores with autograd
    off, so its scores never require grad; set it per instance where an option decides."""
    prompt_processor: PromptProcessor | None = None
    """Prompts to tensors, without a model (rewards that read prompts set it; see the class docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_cache = PromptCache(self._encode_prompts)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """Score validated images (already in the reward's dtype). Image-only rewards implement this; prompt rewards
        inherit it: :meth:`score_encoded` on the cached :meth:`encode_prompts` of each prompt."""
        if self.prompt_processor is None:
            raise NotImplementedError(f"reward '{self.name}' implements neither score nor a prompt_processor")
        return self.score_encoded(images, self.prompt_cache(prompts, images.device, images.dtype))

    def encode_prompts(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of scoring that depends on the prompt tensors alone (e.g. a text encoder). Default: none."""
        return inputs

    def score_encoded(self, images: torch.Tensor, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """Score images (in the reward's dtype) against :meth:`encode_prompts`' output, one row per image."""
        raise NotImplementedError

    def prompt_processors(self) -> dict[str, PromptProcessor]:
        """Each processor this reward's scoring reads, keyed by the prefix of its tensor names (``""`` here)."""
        return {"": self.prompt_processor} if self.prompt_processor is not None else {}

    def _encode_prompts(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        inputs = self.prompt_processor(prompts)  # type: ignore[misc]  (called only when there is one)
        return self.encode_prompts({name: t.to(device) for name, t in inputs.items()})

    def forward(self, images: torch.Tensor, prompts: Prompts = None) -> torch.Tensor:
        prompt_list = self.validate(images, prompts) if self.check_inputs else _as_list(prompts, len(images))
        return self.compute(images, prompt_list)

    def validate(self, images: torch.Tensor, prompts: Prompts) -> list[str] | None:
        """Check images and prompts against the contract; return the prompts as a list (or ``None``)."""
        check_images(images)
        prompt_list = _as_list(prompts, images.shape[0])
        check_prompts(prompt_list, images.shape[0], self.name, self.needs_prompts)
        return prompt_list

    def compute(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """Score without validation: move to the reward's dtype, call :meth:`score`, return float32."""
        images = self._prepare(images)
        with self._autograd():
            return self._checked(self.score(images, prompts), images)

    def compute_inputs(self, images: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`compute` from the prompt processors' tensors (named as by :meth:`prompt_processors`) instead of
        prompts, with nothing cached: the tensor-only path that an exported graph runs."""
        images = self._prepare(images)
        with self._autograd():
            if self.prompt_processor is None:
                return self._checked(self.score(images, None), images)
            return self._checked(self.score_encoded(images, self.encode_prompts(inputs)), images)

    def _autograd(self) -> AbstractContextManager[None]:
        """Autograd as the caller has it for a differentiable reward; off for one that is not (no graph is built
        for scores that cannot carry a gradient)."""
        return torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled())

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Keep parameters frozen; check the device; move the images to the reward's dtype."""
        if any(p.requires_grad for p in self.parameters()):  # e.g. a parent module's requires_grad_(True)
            self.requires_grad_(False)
        state = next((t for t in itertools.chain(self.parameters(), self.buffers()) if t.is_floating_point()), None)
        if state is not None:
            if state.device != images.device:
                raise ValueError(
                    f"reward '{self.name}' is on {state.device} but the images are on {images.device}; "
                    f"move one of them, e.g. reward.to(images.device)"
                )
            images = images.to(state.dtype)
        return images

    def _checked(self, scores: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if scores.shape != (images.shape[0],):
            raise RuntimeError(
                f"reward '{self.name}' returned shape {tuple(scores.shape)}; expected ({images.shape[0]},)"
            )
        return scores.float()

    def freeze(self) -> Reward:
        """Eval mode and no parameter gradients: the only trainable input is the image."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Reward:
        """Rewards always stay in eval mode (deterministic dropout-free scores), even inside a training model."""
        return super().train(False)

    def extra_repr(self) -> str:
        differentiable = "" if self.differentiable else ", differentiable=False"
        return f"name={self.name!r}, needs_prompts={self.needs_prompts}, input_size={self.input_size}{differentiable}"

    # Weighted composition: ``0.7 * a + 0.3 * b`` is a CombinedReward.
    def __mul__(self, weight: float) -> CombinedReward:
        from rewards.combine import CombinedReward

        return CombinedReward.of(self).scaled(weight)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> CombinedReward:
        return self * (1.0 / divisor)

    def __neg__(self) -> CombinedReward:
        return self * -1.0

    def __add__(self, other: Reward) -> CombinedReward:
        from rewards.combine import CombinedReward

        if not isinstance(other, Reward):
            return NotImplemented
        return CombinedReward.of(self).plus(CombinedReward.of(other))

    def __radd__(self, other: object) -> CombinedReward:
        from rewards.combine import CombinedReward

        if isinstance(other, (int, float)) and other == 0:  # lets sum([r1, r2]) work
            return CombinedReward.of(self)
        return NotImplemented

    def __sub__(self, other: Reward) -> CombinedReward:
        if not isinstance(other, Reward):
            return NotImplemented
        return self + (-other)


def refuse_tracing(name: str, reason: str) -> None:
    """Raise ``NotImplementedError`` while ``torch.export`` (ONNX export) or ``torch.compile`` traces, for scoring
    that leaves torch's graph (an encoder in PIL, a postprocess whose output size depends on the data); ``reason``
    says what the reward does there."""
    if torch.compiler.is_compiling():
        raise NotImplementedError(
            f"reward '{name}' {reason}: it has no graph to trace or export; score it with the torch reward"
        )


def _as_list(prompts: Prompts, batch: int) -> list[str] | None:
    if prompts is None:
        return None
    if isinstance(prompts, str):
        return [prompts] * batch
    return list(prompts)


def check_images(images: object) -> None:
    """Raise ``ValueError`` (``TypeError`` for non-tensors) naming what is wrong with an image batch."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (float NCHW in [0, 1]); got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.ndim != 4:
        hint = " For one image use images.unsqueeze(0)." if images.ndim == 3 else ""
        raise ValueError(f"images must be 4-D (N, C, H, W); got {images.ndim}-D with shape {shape}.{hint}")
    if images.shape[1] != 3:
        hint = " It looks channels-last: use images.permute(0, 3, 1, 2)." if images.shape[-1] == 3 else ""
        raise ValueError(f"images must have 3 RGB channels in dim 1; got shape {shape}.{hint}")
    if images.numel() == 0:
        raise ValueError(f"images is empty (shape {shape}); expected at least one image of at least 1x1 pixels")
    if not images.is_floating_point():
        hint = " For uint8 images in [0, 255] use images.float() / 255." if images.dtype == torch.uint8 else ""
        raise ValueError(f"images must be a floating-point tensor in [0, 1]; got dtype {images.dtype}.{hint}")
    lo, hi = (v.item() for v in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or Inf values; check the decoder output (e.g. fp16 overflow)")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        if lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE:
            hint = "they look like [-1, 1] (the SD VAE's output): use (images / 2 + 0.5).clamp(0, 1)"
        elif lo >= -RANGE_TOLERANCE and hi <= 255 + RANGE_TOLERANCE:
            hint = "they look like [0, 255]: use images / 255"
        else:
            hint = "rescale them to [0, 1]"
        raise ValueError(f"image values must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g}: {hint}")


def check_prompts(prompts: list[str] | None, batch: int, name: str, needs_prompts: bool) -> None:
    """Raise ``ValueError`` if prompts are missing, of the wrong count, or not strings."""
    if prompts is None:
        if needs_prompts:
            raise ValueError(f"reward '{name}' needs prompts: call reward(images, prompts) with one per image")
        return
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images; pass one prompt per image or one str")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; got {', '.join(sorted(set(bad)))}")
