"""FLUX.1 (dev and schnell): MMDiT transformer over packed 2x2 latent patches with CLIP (pooled) and T5 (tokens)
text encoders and text/image position ids, rectified flow with the resolution-dependent shift ``mu``. Guidance is
distilled: FLUX.1-dev feeds the guidance scale to its guidance embedding in a single pass, schnell has none."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from finetune.families.base import Conditioning, Family, FamilyDefaults, FlowMatchSolver
from finetune.families.sd3 import JOINT_ATTENTION, flow_scheduler


class Flux(Family):
    name = "flux"
    title = "FLUX.1 (dev, schnell)"
    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    lora_targets = JOINT_ATTENTION
    """Both streams of the double blocks; the single blocks' attention shares the ``to_q/k/v`` names."""
    DEV = FamilyDefaults(resolution=1024, num_inference_steps=28, guidance_scale=3.5)
    SCHNELL = FamilyDefaults(resolution=1024, num_inference_steps=4, guidance_scale=0.0)

    @property
    def defaults(self) -> FamilyDefaults:  # type: ignore[override]
        """FLUX.1-dev's published usage, or schnell's (4 steps, no guidance) for a model without the embedding."""
        return self.DEV if self.guidance_embeds else self.SCHNELL

    def check(self) -> None:
        flow_scheduler(self.pipeline)

    @property
    def guidance_embeds(self) -> bool:
        """FLUX.1-dev (guidance-distilled) has a guidance embedding; schnell does not."""
        return bool(self.pipeline.transformer.config.guidance_embeds)

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: 512 for dev, 256 for schnell (their published usage)."""
        return 512 if self.guidance_embeds else 256

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * 2

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """The unpacked latent shape (as the pipeline draws its noise); the sampler works on packed latents."""
        side = 2 * (resolution // (self.vae_scale_factor * 2))
        return (self.pipeline.transformer.config.in_channels // 4, side, side)

    def initial_latents(self, noise: torch.Tensor, solver: FlowMatchSolver) -> torch.Tensor:
        channels, height, width = noise.shape[1:]
        return self.pipeline._pack_latents(noise, len(noise), channels, height, width)

    def guidance_passes(self, guidance_scale: float) -> int:
        return 1  # distilled guidance: one pass at any scale

    def solver(self, num_inference_steps: int, resolution: int, eta: float = 0.0) -> FlowMatchSolver:
        """As the pipeline: sigmas ``linspace(1, 1/T, T)`` shifted by ``mu`` of the packed token count."""
        scheduler = flow_scheduler(self.pipeline)
        config = scheduler.config
        sigmas = (
            None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        )
        _, height, width = self.latent_shape(resolution)
        mu = calculate_shift(
            (height // 2) * (width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return FlowMatchSolver(scheduler, num_inference_steps, sigmas=sigmas, mu=mu, eta=eta)

    def encode(self, prompts: Sequence[str], guidance_scale: float, resolution: int) -> Conditioning:
        """The pipeline's ``encode_prompt`` (T5 tokens, pooled CLIP) and the text and image position ids. No
        unconditional branch: guidance, if any, goes through the guidance embedding."""
        pipeline = self.pipeline
        embeds, pooled, text_ids = pipeline.encode_prompt(
            list(prompts), None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        _, height, width = self.latent_shape(resolution)
        image_ids = pipeline._prepare_latent_image_ids(len(embeds), height // 2, width // 2, self.device, embeds.dtype)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        return Conditioning(cond, None, {"txt_ids": text_ids, "img_ids": image_ids})

    def predict(
        self,
        denoiser: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        batch = latents.shape[0]
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=latents.device, dtype=torch.float32).expand(batch)
        return denoiser(
            hidden_states=latents,
            timestep=timestep.expand(batch).to(latents.device, latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=shared["txt_ids"],
            img_ids=shared["img_ids"],
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        pipeline = self.pipeline
        latents = pipeline._unpack_latents(latents, resolution, resolution, self.vae_scale_factor)
        config = pipeline.vae.config
        return pipeline.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
