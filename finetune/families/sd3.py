"""Stable Diffusion 3 / 3.5: MMDiT transformer with three text encoders (two CLIP, T5), rectified flow with the
scheduler's shift, two-pass guidance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from finetune.families.base import Conditioning, Family, FamilyDefaults, FlowMatchSolver

JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""The joint-attention projections of both streams (image and context) of MMDiT blocks."""

MAX_SEQUENCE_LENGTH = 256
"""T5 tokens per prompt (the pipeline's default)."""


def flow_scheduler(pipeline: Any) -> FlowMatchEulerDiscreteScheduler:
    """A fresh flow-matching scheduler with the pipeline's configuration (shift, dynamic shifting)."""
    if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(
            f"expected the pipeline's FlowMatchEulerDiscreteScheduler; got {type(pipeline.scheduler).__name__}"
        )
    return FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)


class StableDiffusion3(Family):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    lora_targets = JOINT_ATTENTION
    defaults = FamilyDefaults(resolution=1024, num_inference_steps=28, guidance_scale=7.0)

    def check(self) -> None:
        flow_scheduler(self.pipeline)

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self.pipeline.transformer.config.patch_size

    def solver(self, num_inference_steps: int, resolution: int, eta: float = 0.0) -> FlowMatchSolver:
        """As the pipeline: default sigmas, shifted by the scheduler's ``shift``, or by ``mu`` of the image's
        token count when the configuration asks for dynamic shifting."""
        scheduler = flow_scheduler(self.pipeline)
        config = scheduler.config
        mu = None
        if config.get("use_dynamic_shifting"):
            _, height, width = self.latent_shape(resolution)
            patch = self.pipeline.transformer.config.patch_size
            mu = calculate_shift(
                (height // patch) * (width // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return FlowMatchSolver(scheduler, num_inference_steps, mu=mu, eta=eta)

    def encode(self, prompts: Sequence[str], guidance_scale: float, resolution: int) -> Conditioning:
        """The pipeline's ``encode_prompt``: CLIP-L and CLIP-G hidden states side by side, padded to T5's width and
        joined with T5's tokens; pooled CLIP embeddings concatenated."""
        guided = self.guidance_passes(guidance_scale) == 2
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            list(prompts),
            None,
            None,
            device=self.device,
            do_classifier_free_guidance=guided,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if guided else None
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
        return denoiser(
            hidden_states=latents,
            timestep=timestep.expand(latents.shape[0]).to(latents.device),
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        config = self.pipeline.vae.config
        return self.pipeline.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
