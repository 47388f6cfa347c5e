"""Stable Diffusion 1.x/2.x: UNet with one CLIP text encoder, DDIM (epsilon or v-prediction), two-pass guidance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from finetune.families.base import Conditioning, DDIMSolver, Family, FamilyDefaults

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet attention projections (self- and cross-attention), LoRA's default targets on UNet families."""


def ddim_scheduler(pipeline: Any) -> DDIMScheduler:
    """A DDIM scheduler with the pipeline's noise schedule (its own scheduler's configuration)."""
    return DDIMScheduler.from_config(pipeline.scheduler.config)


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    lora_targets = UNET_ATTENTION
    defaults = FamilyDefaults(resolution=512, num_inference_steps=50, guidance_scale=7.5)
    load_kwargs: ClassVar[dict[str, Any]] = dict(safety_checker=None, requires_safety_checker=False)

    def check(self) -> None:
        """Only text-to-image UNets (4 latent channels, no added embeddings); the scheduler becomes DDIM (same noise
        schedule) so that ``pipeline(prompt)`` samples as training does."""
        pipeline = self.pipeline
        unet_config = pipeline.unet.config
        if unet_config.in_channels != 4 or unet_config.get("addition_embed_type") is not None:
            raise ValueError(
                "the pipeline's UNet is not an SD-1.x/2.x text-to-image UNet (4 latent input channels, no added "
                "embeddings); inpainting, depth and SDXL UNets are not supported"
            )
        if unet_config.cross_attention_dim != pipeline.text_encoder.config.hidden_size:
            raise ValueError(
                f"UNet cross-attention width {unet_config.cross_attention_dim} does not match the text encoder's "
                f"hidden size {pipeline.text_encoder.config.hidden_size}"
            )
        if not isinstance(pipeline.scheduler, DDIMScheduler):
            pipeline.scheduler = ddim_scheduler(pipeline)

    def solver(self, num_inference_steps: int, resolution: int, eta: float = 0.0) -> DDIMSolver:
        return DDIMSolver(ddim_scheduler(self.pipeline), num_inference_steps, eta)

    def guidance_passes(self, guidance_scale: float) -> int:
        return 1 if guidance_scale == 1.0 else 2

    def encode(self, prompts: Sequence[str], guidance_scale: float, resolution: int) -> Conditioning:
        """CLIP's last hidden states of ``prompts`` (and of the empty prompt, encoded once, with guidance)."""
        pipeline = self.pipeline

        def embed(texts: Sequence[str]) -> torch.Tensor:
            tokens = pipeline.tokenizer(
                list(texts),
                padding="max_length",
                max_length=pipeline.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            return pipeline.text_encoder(tokens.input_ids.to(self.device))[0]

        cond = embed(prompts)
        guided = self.guidance_passes(guidance_scale) == 2
        uncond = {"encoder_hidden_states": embed([""]).expand_as(cond)} if guided else None
        return Conditioning({"encoder_hidden_states": cond}, uncond)

    def predict(
        self,
        denoiser: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        return denoiser(latents, timestep, encoder_hidden_states=inputs["encoder_hidden_states"]).sample

    def decode(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        vae = self.pipeline.vae
        return vae.decode(latents / vae.config.scaling_factor).sample
