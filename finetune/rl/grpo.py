"""Flow-GRPO (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online RL") for the flow families
(SD3/3.5, FLUX.1).

The deterministic flow ODE becomes an SDE with the same marginals: with velocity ``v`` at noise level ``t`` (the
scheduler's sigma) and ``x + (1 - t) v`` the predicted noise, a step ``dt = t_next - t < 0`` draws the next
latents from N(mu, s^2) with

    mu = x + (v + sigma_t^2 / (2 t) (x + (1 - t) v)) dt,    s = sigma_t sqrt(-dt),    sigma_t = a sqrt(t / (1 - t))

(``a`` is ``grpo_noise_level``, 0.7 in the paper). At ``t = 1`` the denominator uses the next sigma of the
schedule, as the authors' code does. Each prompt of a round is sampled ``grpo_group_size`` times and the
advantages are group-relative: ``(r - mean) / (std + 1e-4)`` within the group (population std). The PPO round is
:mod:`finetune.rl.policy`'s; ``grpo_kl_weight`` adds ``KL(pi_theta || pi_base)`` of each step, which for two
Gaussians of the same ``s`` is ``|mu_theta - mu_base|^2 / (2 s^2)`` (averaged over latent elements, as the
log-probabilities are). The base policy is the same denoiser with its LoRA adapters disabled: no second copy of
the weights.

Deviations from the authors' code: training samples use the family's sampling schedule (``num_inference_steps``;
the paper trains with fewer steps than it evaluates with, which ``--num-inference-steps`` sets), and every position
is a candidate for ``ddpo_timestep_fraction`` (no separate SDE window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from finetune.families import Conditioning
from finetune.lora import adapters_disabled
from finetune.rl.policy import PolicyGradient, Transition

EPS = 1e-4
"""Added to a group's reward standard deviation (the authors' value)."""


def group_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(r - mean) / (std + 1e-4)`` within each run of ``group_size`` consecutive rows (one prompt's group)."""
    groups = scores.detach().double().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + EPS)).flatten().float()


def sde_transition(
    velocity: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor, index: int, noise_level: float
) -> Transition:
    """The Gaussian SDE step from schedule position ``index`` (noise levels ``sigmas``, then the final 0)."""
    sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
    dt = sigma_next - sigma
    level = sde_level(sigmas, index, noise_level)
    x, v = latents.float(), velocity.float()
    mean = x + (v + level**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return Transition(mean, torch.tensor(level * math.sqrt(-dt), device=mean.device))


def sde_level(sigmas: torch.Tensor, index: int, noise_level: float) -> float:
    """``sigma_t = a sqrt(t / (1 - t))`` at position ``index`` (``t = 1`` uses the next sigma in the denominator)."""
    sigma = float(sigmas[index])
    denominator = 1 - (float(sigmas[1]) if sigma >= 1 else sigma)
    return noise_level * math.sqrt(sigma / denominator)


class GRPO(PolicyGradient):
    """Flow-GRPO: group-relative advantages, PPO's clipped objective over the SDE's steps, optional KL to the base."""

    name = "grpo"
    families = ("sd3", "flux")
    other = "Flow-GRPO turns a flow-matching sampler into an SDE; DDIM models (SD 1.x/2.x, SDXL) use --method ddpo"

    @property
    def sigmas(self) -> torch.Tensor:
        return self.trainer.sampler.solver.sigmas

    def noise_std(self, index: int) -> float:
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        return sde_level(self.sigmas, index, self.trainer.config.grpo_noise_level) * math.sqrt(sigma - sigma_next)

    def transition(self, output: torch.Tensor, index: int, latents: torch.Tensor) -> Transition:
        return sde_transition(output, latents, self.sigmas, index, self.trainer.config.grpo_noise_level)

    def step_noise(self, noise: torch.Tensor) -> torch.Tensor:
        # The family's layout of the latents (FLUX packs 2 x 2 patches: a permutation, so still standard normal).
        return self.trainer.sampler.initial_latents(noise)

    def prompt_indices(self, count: int, generator: torch.Generator, total: int) -> torch.Tensor:
        size = self.trainer.config.grpo_group_size
        return torch.randint(total, (count // size,), generator=generator).repeat_interleave(size)

    def advantages(self, prompts: Sequence[str], scores: torch.Tensor) -> torch.Tensor:
        return group_advantages(scores, self.trainer.config.grpo_group_size)

    def kl(self, latents: torch.Tensor, index: int, conditioning: Conditioning, step: Transition) -> torch.Tensor:
        if self.trainer.config.grpo_kl_weight == 0:
            return super().kl(latents, index, conditioning, step)
        sampler = self.trainer.sampler
        with torch.no_grad(), adapters_disabled(self.trainer.family.denoiser):
            output = sampler.guided_noise(latents, sampler.timesteps[index], conditioning)
            base = self.transition(output, index, latents)
        squared = (step.mean - base.mean) ** 2
        return squared.mean(dim=tuple(range(1, squared.ndim))) / (2 * step.std**2)
