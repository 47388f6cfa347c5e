"""DDPO (Black et al., 2023, "Training Diffusion Models with Reinforcement Learning"; kvablack/ddpo-pytorch) for the
DDIM families (SD 1.x/2.x, SDXL).

Sampling is DDIM with ``eta > 0`` (``ddpo_eta``, 1 as in DDPO), a Gaussian policy: from position ``i`` the next
latents are drawn from N(mu, sigma^2) where ``mu`` is the DDIM posterior mean that ``DDIMScheduler.step`` computes
(called with zero variance noise, so epsilon, v and sample prediction, clipping and thresholding are diffusers')
and ``sigma = eta * sqrt(variance)`` from the scheduler's own variance, as ddpo-pytorch's
``ddim_step_with_logprob`` does. Classifier-free guidance is applied as in sampling, in the rollout and in training.
Rewards are normalised per prompt with running statistics (:class:`PerPromptStatTracker`, DDPO's
``per_prompt_stat_tracking``) and clipped to ``ddpo_adv_clip``; the PPO round is :mod:`finetune.rl.policy`'s.

Deviations from ddpo-pytorch, all in what the round trains on, none in the objective:

* the trained positions (``ddpo_timestep_fraction`` < 1) are drawn once per minibatch, not per sample, so a
  denoiser call runs one timestep for every row (with the default fraction 1 every position is trained and the two
  agree);
* positions whose step is deterministic (the last DDIM step when ``set_alpha_to_one`` makes its variance 0) have
  no log-probability and are left out (ddpo-pytorch's SD 1.4 scheduler has no such step);
* the per-prompt statistics use the whole round of every process, gathered, as ddpo-pytorch does, and are kept in
  checkpoints, so a resumed run normalises as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from finetune.rl.policy import PolicyGradient, Transition

if TYPE_CHECKING:
    from finetune.trainer import Trainer

EPS = 1e-6
"""Added to the standard deviation of the rewards (ddpo-pytorch's value)."""


class PerPromptStatTracker:
    """Running reward statistics per prompt: each prompt keeps its last ``buffer_size`` rewards; a prompt with fewer
    than ``min_count`` is normalised with the round's mean and standard deviation instead (population statistics,
    as ddpo-pytorch's ``PerPromptStatTracker``). ``min_count`` above ``buffer_size`` always uses the round's."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, list[float]] = {}

    def update(self, prompts: Sequence[str], scores: torch.Tensor) -> torch.Tensor:
        """Add the round's rewards to the buffers and return their advantages ``(r - mean) / (std + 1e-6)``."""
        scores = scores.detach().double().cpu()
        advantages = torch.empty_like(scores)
        round_mean, round_std = scores.mean(), scores.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, [])
            buffer.extend(scores[rows].tolist())
            del buffer[: -self.buffer_size]
            if len(buffer) < self.min_count:
                mean, std = round_mean, round_std
            else:
                values = torch.tensor(buffer, dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            advantages[rows] = (scores[rows] - mean) / (std + EPS)
        return advantages.float()

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {prompt: list(values) for prompt, values in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {prompt: list(values) for prompt, values in state.get("buffers", {}).items()}


class DDPO(PolicyGradient):
    """DDPO with PPO's clipped objective (DDPO-IS) over stochastic DDIM trajectories."""

    name = "ddpo"
    families = ("sd", "sdxl")
    other = "DDPO samples with stochastic DDIM; flow-matching models (SD3, FLUX) use --method grpo"

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        config = trainer.config
        self.tracker = PerPromptStatTracker(config.ddpo_buffer_size, config.ddpo_min_count)

    @property
    def scheduler(self) -> Any:
        return self.trainer.sampler.solver.scheduler

    def _timesteps(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        scheduler = self.scheduler
        timestep = scheduler.timesteps[index]
        return timestep, timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps

    def noise_std(self, index: int) -> float:
        """``eta * sqrt(variance)`` of DDIM's step from position ``index`` (the scheduler's variance)."""
        return self.trainer.config.ddpo_eta * self.scheduler._get_variance(*self._timesteps(index)).sqrt().item()

    def transition(self, output: torch.Tensor, index: int, latents: torch.Tensor) -> Transition:
        eta = self.trainer.config.ddpo_eta
        zero = torch.zeros_like(output, dtype=torch.float32)
        timestep, _ = self._timesteps(index)
        mean = self.scheduler.step(output.float(), timestep, latents.float(), eta=eta, variance_noise=zero).prev_sample
        return Transition(mean, torch.tensor(self.noise_std(index), device=mean.device))

    def prompt_indices(self, count: int, generator: torch.Generator, total: int) -> torch.Tensor:
        return torch.randint(total, (count,), generator=generator)

    def advantages(self, prompts: Sequence[str], scores: torch.Tensor) -> torch.Tensor:
        return self.tracker.update(prompts, scores)

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state.get("tracker", {}))
