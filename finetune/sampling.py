"""DDIM sampling with classifier-free guidance that gradients can flow through.

The scheduler maths is diffusers' own (``DDIMScheduler.step``); this module only decides which steps run under
``torch.no_grad`` and which keep the graph. Each grad-step UNet call is optionally checkpointed (so peak memory
stays nearly flat as the number of grad steps grows) in chunks of ``chunk_size`` images (so the recomputation
during backward holds one chunk's activations, not the batch's). The no-grad steps can run through a
``torch.compile``d UNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch.utils.checkpoint import checkpoint

from finetune.timing import PhaseTimer


@dataclass
class Conditioning:
    """Text embeddings of a batch: ``cond`` [B, L, D] and, with guidance, ``uncond`` (the empty prompt) [B, L, D]."""

    cond: torch.Tensor
    uncond: torch.Tensor | None

    def repeat(self, n: int) -> Conditioning:
        """Each row repeated ``n`` times (row-major: a, a, b, b for n = 2)."""
        uncond = None if self.uncond is None else self.uncond.repeat_interleave(n, dim=0)
        return Conditioning(self.cond.repeat_interleave(n, dim=0), uncond)

    def rows(self, index: slice) -> Conditioning:
        """The embeddings of the batch rows ``index``."""
        return Conditioning(self.cond[index], None if self.uncond is None else self.uncond[index])


def encode_prompts(pipeline: StableDiffusionPipeline, prompts: Sequence[str], guidance_scale: float) -> Conditioning:
    """Text embeddings for ``prompts`` (and the empty prompt when ``guidance_scale != 1``), on the UNet's device."""
    device = pipeline.unet.device

    def embed(texts: Sequence[str]) -> torch.Tensor:
        tokens = pipeline.tokenizer(
            list(texts),
            padding="max_length",
            max_length=pipeline.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return pipeline.text_encoder(tokens.input_ids.to(device))[0]

    cond = embed(prompts)
    uncond = embed([""]).expand_as(cond) if guidance_scale != 1.0 else None
    return Conditioning(cond, uncond)


def batch_slices(total: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``total`` rows (one slice when ``size`` is ``None``)."""
    size = size or total
    return [slice(start, start + size) for start in range(0, total, size)]


@dataclass
class Sampler:
    """DDIM with classifier-free guidance over a fixed ``num_inference_steps`` schedule."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    checkpoint_unet: bool = True
    checkpoint_decode: bool = False
    chunk_size: int | None = None
    """Images per checkpointed UNet call in grad steps (``None``: the whole batch in one call)."""
    prefix_unet: Callable[..., Any] | None = None
    """The UNet the no-grad steps call, e.g. ``torch.compile(unet)``; ``None`` uses ``unet``."""
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    """Records the time of the no-grad and grad sampling phases when enabled (see ``finetune.timing``)."""

    def __post_init__(self) -> None:
        self.scheduler.set_timesteps(self.num_inference_steps)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def guided_noise(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The UNet's guided prediction (noise, or v for v-prediction models) at timestep ``t``."""
        unet = self.unet if torch.is_grad_enabled() or self.prefix_unet is None else self.prefix_unet
        if conditioning.uncond is None:
            return unet(latents, t, encoder_hidden_states=conditioning.cond).sample
        both = unet(
            torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([conditioning.uncond, conditioning.cond])
        ).sample
        uncond, cond = both.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _model_output(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
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
        """One DDIM step from schedule position ``index``; returns ``(previous sample, predicted x0)``."""
        t = self.timesteps[index]
        output = self._model_output(latents, t, conditioning)
        result = self.scheduler.step(output, t, latents, eta=self.eta, generator=generator)
        return result.prev_sample, result.pred_original_sample

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
            return self.vae.decode(z / self.vae.config.scaling_factor).sample

        decoded = checkpoint(run, latents, use_reentrant=False) if self.checkpoint_decode else run(latents)
        return (decoded.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def generate(
    pipeline: StableDiffusionPipeline,
    sampler: Sampler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: tuple[int, int, int],
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Images [len(prompts) * len(seeds), 3, H, W] in [0, 1]: full no-grad sampling, each seed's noise drawn
    from its own generator so an image does not depend on the batching (row-major: every seed of the first
    prompt, then the next prompt)."""
    noises = torch.cat([torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    pairs = [(p, noise) for p in prompts for noise in noises]
    images = []
    for rows in batch_slices(len(pairs), batch_size):
        chunk = pairs[rows]
        noise = torch.stack([n for _, n in chunk]).to(device)
        with autocast():
            conditioning = encode_prompts(pipeline, [p for p, _ in chunk], sampler.guidance_scale)
            latents = sampler.denoise(noise, conditioning, 0, len(sampler.timesteps), grad=False)
            images.append(sampler.decode(latents).cpu())
    return torch.cat(images)
