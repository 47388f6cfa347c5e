"""Guided sampling that gradients can flow through, for every model family.

The model maths is the family's (:mod:`finetune.families`: conditioning, the guided denoiser call, the solver
step of diffusers' scheduler, decode); this module only decides which steps run under ``torch.no_grad`` and which
keep the graph. Each grad-step denoiser call is optionally checkpointed (so peak memory stays nearly flat as the
number of grad steps grows) in chunks of ``chunk_size`` images (so the recomputation during backward holds one
chunk's activations, not the batch's). The no-grad steps can run through a ``torch.compile``d denoiser.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from finetune.families import Conditioning, Family
from finetune.timing import PhaseTimer


def batch_slices(total: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``total`` rows (one slice when ``size`` is ``None``)."""
    size = size or total
    return [slice(start, start + size) for start in range(0, total, size)]


@dataclass
class Sampler:
    """A family's sampler with guidance over a fixed ``num_inference_steps`` schedule at one resolution."""

    family: Family
    resolution: int
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    """DDIM's eta (DDIM families only)."""
    checkpoint_unet: bool = True
    """Checkpoint each grad-step denoiser call (UNet or transformer)."""
    checkpoint_decode: bool = False
    chunk_size: int | None = None
    """Images per checkpointed denoiser call in grad steps (``None``: the whole batch in one call)."""
    prefix_unet: Callable[..., Any] | None = None
    """The denoiser the no-grad steps call, e.g. ``torch.compile(denoiser)``; ``None`` uses the family's."""
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    """Records the time of the no-grad and grad sampling phases when enabled (see ``finetune.timing``)."""
    offload_text_encoders: bool = False
    """Keep the text encoders on the CPU between encodings: each :meth:`encode` moves them to the denoiser's
    device and back (GPU memory for SD3's and FLUX's T5-XXL, 9.5 GB in bf16, is then free during sampling)."""

    def __post_init__(self) -> None:
        self.solver = self.family.solver(self.num_inference_steps, self.resolution, self.eta)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.solver.timesteps

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one image's initial noise."""
        return self.family.latent_shape(self.resolution)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning of ``prompts`` (with the unconditional branch when the family guides in two passes)."""
        if not self.offload_text_encoders:
            return self.family.encode(prompts, self.guidance_scale, self.resolution)
        encoders = self.family.text_encoders()
        for encoder in encoders:
            encoder.to(self.family.device)
        try:
            return self.family.encode(prompts, self.guidance_scale, self.resolution)
        finally:
            for encoder in encoders:
                encoder.to("cpu")

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The state at schedule position 0 from standard normal noise of :attr:`latent_shape`."""
        return self.family.initial_latents(noise, self.solver)

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """Clean latents noised to schedule position ``index``'s level."""
        return self.solver.renoise(x0, noise, index)

    def guided_noise(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's guided prediction (noise, v or flow velocity) at timestep ``t``."""
        grad = torch.is_grad_enabled()
        denoiser = self.family.denoiser if grad or self.prefix_unet is None else self.prefix_unet
        return self.family.guided(denoiser, latents, t, conditioning, self.guidance_scale)

    def model_output(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The guided prediction at timestep ``t``, each chunk's denoiser call checkpointed when grad is on."""
        if not (self.checkpoint_unet and torch.is_grad_enabled()):
            return self.guided_noise(latents, t, conditioning)
        chunks = [
            checkpoint(self.guided_noise, latents[rows], t, conditioning.rows(rows), use_reentrant=False)
            for rows in batch_slices(len(latents), self.chunk_size)
        ]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def step(
        self, latents: torch.Tensor, index: int, conditioning: Conditioning, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver step from schedule position ``index``; returns ``(next sample, predicted x0)``."""
        output = self.model_output(latents, self.timesteps[index], conditioning)
        return self.solver.step(output, index, latents, generator)

    def denoise(
        self,
        latents: torch.Tensor,
        conditioning: Conditioning,
        start: int,
        stop: int,
        grad: bool,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run schedule positions ``start .. stop-1``, keeping the graph only when ``grad``."""
        grad = grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), self.timer.phase("grad steps forward" if grad else "no-grad sampling"):
            for index in range(start, stop):
                latents, _ = self.step(latents, index, conditioning, generator)
        return latents

    def predict_x0(
        self, latents: torch.Tensor, index: int, conditioning: Conditioning, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The predicted clean latents of one grad step from schedule position ``index`` (ReFL's shortcut)."""
        with self.timer.phase("grad steps forward"):
            return self.step(latents, index, conditioning, generator)[1]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents to images in [0, 1] (the reward's input range), checkpointed if configured."""

        def run(z: torch.Tensor) -> torch.Tensor:
            return self.family.decode(z, self.resolution)

        decoded = checkpoint(run, latents, use_reentrant=False) if self.checkpoint_decode else run(latents)
        return (decoded.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def generate(
    sampler: Sampler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Images [len(prompts) * len(seeds), 3, H, W] in [0, 1]: full no-grad sampling, each seed's noise drawn
    from its own generator so an image does not depend on the batching (row-major: every seed of the first
    prompt, then the next prompt). ``shard=(i, n)`` renders only every n-th image from the i-th (one process's
    share of an evaluation)."""
    shape = sampler.latent_shape
    noises = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    index, count = shard
    pairs = [(p, noise) for p in prompts for noise in noises][index::count]
    images = []
    for rows in batch_slices(len(pairs), batch_size):
        chunk = pairs[rows]
        noise = torch.stack([n for _, n in chunk]).to(device)
        with autocast():
            conditioning = sampler.encode([p for p, _ in chunk])
            latents = sampler.initial_latents(noise)
            latents = sampler.denoise(latents, conditioning, 0, len(sampler.timesteps), grad=False)
            images.append(sampler.decode(latents).cpu())
    return torch.cat(images)
