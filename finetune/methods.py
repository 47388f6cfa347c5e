"""Reward-gradient methods: each turns (sampler, text conditioning, initial noise) into clean latents that carry
the graph. They are family-agnostic: the sampler's family supplies the model calls and the solver.

The trainer decodes the returned latents, scores the images with the reward and minimises ``-mean(reward)``; a
method decides which sampling steps keep the graph:

* ``draft``: every step (full backpropagation through the sampling chain);
* ``draft-k``: only the last K steps; the first T - K run under ``torch.no_grad``;
* ``draft-lv``: K = 1 with the low-variance estimator: the final sample is re-noised ``lv_n`` times to the last
  step's noise level and each copy is denoised once with grad, so the reward gradients are averaged;
* ``refl``: ReFL: sample without grad to a random step in a late range, then predict x0 in one grad step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from finetune.sampling import Conditioning, Sampler


@dataclass(frozen=True)
class MethodSettings:
    """The knobs the methods read (a view of the training configuration)."""

    k: int = 1
    lv_n: int = 2
    refl_range: tuple[float, float] = (0.75, 1.0)


@dataclass
class BatchRandom:
    """Random draws for one batch that do not depend on how the global batch is split across processes.

    Every process holds the same generator state. Per-sample noise is drawn for the whole global batch and each
    process keeps its own rows, so N processes with batch b draw exactly what one process with batch N*b draws,
    and scalar draws (ReFL's stopping step) agree on every rank. (DDIM noise for ``eta > 0`` is drawn per process.)
    """

    generator: torch.Generator
    global_batch: int
    rows: slice = field(default_factory=lambda: slice(None))

    def normal(self, shape: tuple[int, ...], copies: int = 1) -> torch.Tensor:
        """Standard normal noise [local batch * copies, *shape] (the copies of one sample are consecutive)."""
        draw = torch.randn((self.global_batch, copies, *shape), generator=self.generator)
        return draw[self.rows].flatten(0, 1)


@dataclass
class Generated:
    """Clean latents still attached to the graph, and the index of the prompt behind each one."""

    latents: torch.Tensor
    prompt_index: torch.Tensor


Method = Callable[[Sampler, Conditioning, torch.Tensor, MethodSettings, BatchRandom], Generated]


def draft_k(
    sampler: Sampler, conditioning: Conditioning, noise: torch.Tensor, settings: MethodSettings, rng: BatchRandom
) -> Generated:
    """DRaFT-K: no-grad prefix of T - K steps, then K grad steps."""
    total = len(sampler.timesteps)
    latents = sampler.initial_latents(noise)
    latents = sampler.denoise(latents, conditioning, 0, total - settings.k, grad=False, generator=rng.generator)
    latents = sampler.denoise(latents, conditioning, total - settings.k, total, grad=True, generator=rng.generator)
    return Generated(latents, torch.arange(len(noise)))


def draft(
    sampler: Sampler, conditioning: Conditioning, noise: torch.Tensor, settings: MethodSettings, rng: BatchRandom
) -> Generated:
    """DRaFT: backpropagate through all T steps (DRaFT-K with K = T)."""
    full = MethodSettings(len(sampler.timesteps), settings.lv_n, settings.refl_range)
    return draft_k(sampler, conditioning, noise, full, rng)


def draft_lv(
    sampler: Sampler, conditioning: Conditioning, noise: torch.Tensor, settings: MethodSettings, rng: BatchRandom
) -> Generated:
    """DRaFT-LV: sample x0 without grad, re-noise it ``lv_n`` times to the last step's level, denoise each copy once
    with grad. The copies of one prompt are consecutive in the batch."""
    total = len(sampler.timesteps)
    x0 = sampler.denoise(sampler.initial_latents(noise), conditioning, 0, total, grad=False, generator=rng.generator)
    n = settings.lv_n
    x0 = x0.repeat_interleave(n, dim=0)
    fresh = rng.normal(tuple(x0.shape[1:]), copies=n).to(x0.device, x0.dtype)
    noisy = sampler.renoise(x0, fresh, total - 1)
    latents = sampler.denoise(noisy, conditioning.repeat(n), total - 1, total, grad=True, generator=rng.generator)
    return Generated(latents, torch.arange(len(noise)).repeat_interleave(n))


def refl(
    sampler: Sampler, conditioning: Conditioning, noise: torch.Tensor, settings: MethodSettings, rng: BatchRandom
) -> Generated:
    """ReFL: no-grad sampling to a random schedule position in ``refl_range`` (fractions of T), then one grad step
    whose predicted x0 is decoded and rewarded."""
    low, high = refl_stop_range(len(sampler.timesteps), settings.refl_range)
    stop = int(torch.randint(low, high + 1, (1,), generator=rng.generator))
    latents = sampler.denoise(
        sampler.initial_latents(noise), conditioning, 0, stop, grad=False, generator=rng.generator
    )
    x0 = sampler.predict_x0(latents, stop, conditioning, rng.generator)
    return Generated(x0, torch.arange(len(noise)))


def refl_stop_range(total: int, refl_range: tuple[float, float]) -> tuple[int, int]:
    """ReFL's stopping positions: the grad step runs from a schedule position drawn uniformly in ``[low, high]``."""
    low = min(math.ceil(refl_range[0] * total), total - 1)
    high = max(low, min(math.ceil(refl_range[1] * total) - 1, total - 1))
    return low, high


METHODS: dict[str, Method] = {"draft": draft, "draft-k": draft_k, "draft-lv": draft_lv, "refl": refl}
