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
    """Random draws for one optimizer step that do not depend on how its batch is split into micro-batches and
    processes.

    Every process holds the same generator state. Each draw is made once, for the step's whole global batch, and
    each micro-batch on each process keeps its own ``rows``: the views made by :meth:`view` share the draws, the
    n-th draw of a view being the step's n-th draw. So gradient accumulation over m micro-batches on N processes
    with batch b draws exactly what one process with batch m*N*b draws, and scalar draws (ReFL's stopping step)
    are shared by every micro-batch and rank. (DDIM noise for ``eta > 0`` is drawn per micro-batch and process.)
    """

    generator: torch.Generator
    global_batch: int
    rows: slice = field(default_factory=lambda: slice(None))
    draws: list[torch.Tensor] = field(default_factory=list)
    """The step's draws so far, shared by its views."""
    used: int = 0
    """How many of ``draws`` this view has taken."""

    def view(self, rows: slice) -> BatchRandom:
        """The draws of the global-batch rows ``rows`` (one micro-batch on one process)."""
        return BatchRandom(self.generator, self.global_batch, rows, self.draws)

    def normal(self, shape: tuple[int, ...], copies: int = 1) -> torch.Tensor:
        """Standard normal noise [local batch * copies, *shape] (the copies of one sample are consecutive)."""
        draw = self._draw((self.global_batch, copies, *shape), torch.randn)
        return draw[self.rows].flatten(0, 1)

    def randint(self, low: int, high: int) -> int:
        """One integer drawn uniformly from ``[low, high)``, the same for every row of the step."""
        return int(self._draw((1,), lambda size, generator: torch.randint(low, high, size, generator=generator)))

    def _draw(self, size: tuple[int, ...], sample: Callable[..., torch.Tensor]) -> torch.Tensor:
        if self.used == len(self.draws):
            self.draws.append(sample(size, generator=self.generator))
        draw = self.draws[self.used]
        if draw.shape != size:
            raise RuntimeError(
                f"draw {self.used} of this step has shape {tuple(draw.shape)} in an earlier micro-batch and "
                f"{size} in this one: a method must make the same draws in every micro-batch of a step"
            )
        self.used += 1
        return draw


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
    stop = rng.randint(low, high + 1)
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
