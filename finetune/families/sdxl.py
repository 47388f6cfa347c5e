"""Stable Diffusion XL: UNet with two CLIP text encoders (hidden states concatenated, pooled embedding and
``add_time_ids`` as added conditions), DDIM over the model's noise schedule, two-pass guidance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from finetune.families.base import Conditioning, DDIMSolver, Family, FamilyDefaults
from finetune.families.sd import UNET_ATTENTION, ddim_scheduler


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = StableDiffusionXLPipeline
    denoiser_name = "unet"
    lora_targets = UNET_ATTENTION
    defaults = FamilyDefaults(resolution=1024, num_inference_steps=50, guidance_scale=5.0)

    def check(self) -> None:
        """Text-to-image SDXL base only (both text encoders, a ``text_time`` UNet with 4 input channels); the
        scheduler becomes DDIM with the model's noise schedule."""
        pipeline = self.pipeline
        unet_config = pipeline.unet.config
        if pipeline.text_encoder is None or pipeline.text_encoder_2 is None:
            raise ValueError("SDXL needs both text encoders; refiner-style pipelines without one are not supported")
        if unet_config.in_channels != 4 or unet_config.get("addition_embed_type") != "text_time":
            raise ValueError("the pipeline's UNet is not an SDXL text-to-image UNet (4 input channels, text_time)")
        if not isinstance(pipeline.scheduler, DDIMScheduler):
            pipeline.scheduler = ddim_scheduler(pipeline)

    def solver(self, num_inference_steps: int, resolution: int, eta: float = 0.0) -> DDIMSolver:
        return DDIMSolver(ddim_scheduler(self.pipeline), num_inference_steps, eta)

    def encode(self, prompts: Sequence[str], guidance_scale: float, resolution: int) -> Conditioning:
        """The pipeline's ``encode_prompt`` (the empty prompt is all zeros when the model says so) and its
        ``add_time_ids`` for an uncropped square image of ``resolution``."""
        pipeline = self.pipeline
        guided = self.guidance_passes(guidance_scale) == 2
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            list(prompts), device=self.device, do_classifier_free_guidance=guided
        )
        time_ids = pipeline._get_add_time_ids(
            (resolution, resolution),
            (0, 0),
            (resolution, resolution),
            dtype=embeds.dtype,
            text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
        )
        time_ids = time_ids.to(self.device).repeat(len(embeds), 1)
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
        uncond = None
        if guided:
            uncond = {"encoder_hidden_states": negative, "text_embeds": negative_pooled, "time_ids": time_ids}
        return Conditioning(cond, uncond)

    def predict(
        self,
        denoiser: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return denoiser(
            latents, timestep, encoder_hidden_states=inputs["encoder_hidden_states"], added_cond_kwargs=added
        ).sample

    def decode(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        config = self.pipeline.vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        return self.pipeline.vae.decode(latents).sample
