"""The round shared by DDPO and Flow-GRPO: sample trajectories recording each transition's log-probability, reward
the final images as a black box, turn the rewards into advantages, then minimise PPO's clipped objective.

One trainer step is one round. Each process samples ``batch_size x grad_accum`` trajectories (in micro-batches of
``batch_size``; the prompts and noise come from the step's global draws, as for the DRaFT methods, so they do not
depend on how the round is split over processes). The rewards of every process are gathered and the advantages
computed on the whole round, so per-prompt statistics and groups may span processes. Then, for each of
``ddpo_inner_epochs`` passes, the process's trajectories are shuffled (in the order of one permutation of the
whole round, drawn alike on every process) and split into ``ddpo_minibatches`` minibatches; each minibatch makes
one optimizer step whose gradient is accumulated over its rows (in micro-batches of ``batch_size``) and over the
trained positions of the schedule (a ``ddpo_timestep_fraction`` of them, drawn per minibatch), as ddpo-pytorch
accumulates over its train batches and timesteps. Each (micro-batch, position) pair is one forward and one
backward of the DDP-wrapped model, all but the last of a minibatch under ``no_sync``. The loss of a transition
with log-probability ratio ``r`` to the sampling policy and clipped advantage ``A`` is
``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` (plus a KL term for GRPO), averaged over the minibatch's rows and
positions.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from finetune import distributed
from finetune.families import Conditioning
from finetune.methods import BatchRandom
from finetune.sampling import batch_slices

if TYPE_CHECKING:
    from finetune.trainer import Trainer


CLIPPING_ROUNDS = 5
"""Rounds over which :meth:`PolicyGradient.warn_if_clipped` averages the share of clipped ratios."""


@dataclass
class Transition:
    """A Gaussian sampling step: the mean of the next latents and their standard deviation (a scalar tensor)."""

    mean: torch.Tensor
    std: torch.Tensor


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std^2) per element, averaged over all but the batch dimension (as DDPO and Flow-GRPO
    average it), in float32: [B]."""
    sample, mean, std = sample.float(), mean.float(), std.float()
    log_prob = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """PPO's clipped surrogate per row, and the importance ratio: ``(max(-A r, -A clip(r, 1-eps, 1+eps)), r)``."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped), ratio


@dataclass
class Round:
    """One round's trajectories on this process (rows in sampling order)."""

    prompts: list[str]
    latents: torch.Tensor
    """[N, T + 1, ...]: the state at each schedule position, then the final latents."""
    log_probs: torch.Tensor
    """[N, T]: log-probability of ``latents[:, i + 1]`` given ``latents[:, i]`` under the sampling policy."""
    scores: torch.Tensor
    """[N] rewards of this process's rows."""
    advantages: torch.Tensor
    """[N] advantages (normalised over the whole round, clipped)."""
    rows: torch.Tensor
    """[N] the rows' places in the round's global order (micro-batch-major, then process)."""
    all_scores: torch.Tensor
    """Every process's rewards (the round's global order)."""
    members: dict[str, torch.Tensor]
    """Each mix member's scores over every process."""


class PolicyGradient(ABC):
    """An RL method of the trainer: its stochastic transition, its prompt draws and its advantages."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    """The model families (``finetune.families`` names) whose sampler this method's transition follows."""
    other: ClassVar[str]
    """What to use on the other families (for the error message)."""

    def __init__(self, trainer: Trainer) -> None:
        family = trainer.family
        if family.name not in self.families:
            raise ValueError(f"--method {self.name} does not apply to {family.title}: {self.other}")
        self.trainer = trainer
        self.recent_clipfrac: deque[float] = deque(maxlen=CLIPPING_ROUNDS)
        self.warned_clipping = False

    # ------------------------------------------------------------------------------------- method-specific
    @abstractmethod
    def transition(self, output: torch.Tensor, index: int, latents: torch.Tensor) -> Transition:
        """The Gaussian step from schedule position ``index`` given the guided model output (float32)."""

    @abstractmethod
    def noise_std(self, index: int) -> float:
        """The standard deviation of the step from schedule position ``index``."""

    @abstractmethod
    def prompt_indices(self, count: int, generator: torch.Generator, total: int) -> torch.Tensor:
        """Indices into the ``total`` training prompts of the round's ``count`` rows."""

    @abstractmethod
    def advantages(self, prompts: Sequence[str], scores: torch.Tensor) -> torch.Tensor:
        """Advantages of the round's rewards (every process's rows, in the round's order), before clipping."""

    def kl(self, latents: torch.Tensor, index: int, conditioning: Conditioning, step: Transition) -> torch.Tensor:
        """Per-row penalty added to the loss (none here; GRPO's KL to the base model)."""
        return torch.zeros(len(latents), device=latents.device)

    def step_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of the latent shape in the sampler's layout (FLUX packs its latents)."""
        return noise

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the method (e.g. running statistics)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (stateless unless overridden)
        """Restore :meth:`state_dict`."""

    # ------------------------------------------------------------------------------------------ transitions
    def positions(self) -> list[int]:
        """The schedule positions that can be trained: those with a non-zero step noise (a deterministic final
        DDIM step, e.g. with ``set_alpha_to_one``, has no log-probability)."""
        return [i for i in range(len(self.trainer.sampler.timesteps)) if self.noise_std(i) > 0]

    def forward(
        self, prompts: list[str], latents: torch.Tensor, next_latents: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The current policy's log-probability of ``latents -> next_latents`` at position ``index`` and the
        per-row penalty (what the DDP-wrapped model runs: text encoding, the guided denoiser call, the step)."""
        trainer = self.trainer
        conditioning = trainer._conditioning(prompts)
        output = trainer.sampler.model_output(latents, trainer.sampler.timesteps[index], conditioning)
        step = self.transition(output, index, latents)
        return gaussian_log_prob(next_latents, step.mean, step.std), self.kl(latents, index, conditioning, step)

    @torch.no_grad()
    def rollout(self, prompts: list[str], noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample trajectories from noise [B, T + 1, ...] (the start, then each step's noise): the states
        [B, T + 1, ...] and each transition's log-probability [B, T], computed as :meth:`forward` computes it."""
        trainer = self.trainer
        sampler = trainer.sampler
        conditioning = trainer._conditioning(prompts)
        latents = sampler.initial_latents(noise[:, 0]).float()
        states, log_probs = [latents], []
        for index in range(len(sampler.timesteps)):
            output = sampler.model_output(latents, sampler.timesteps[index], conditioning)
            step = self.transition(output, index, latents)
            latents = step.mean + step.std * self.step_noise(noise[:, index + 1]).float()
            states.append(latents)
            log_probs.append(gaussian_log_prob(latents, step.mean, step.std))
        return torch.stack(states, dim=1), torch.stack(log_probs, dim=1)

    # -------------------------------------------------------------------------------------------- the round
    def collect(self) -> Round:
        """Sample this process's share of a round, reward it, and compute the advantages over the whole round."""
        trainer, config = self.trainer, self.trainer.config
        batch, world = config.batch_size, trainer.world
        step_rng = BatchRandom(trainer.generator, batch * world * config.grad_accum)
        indices = self.prompt_indices(step_rng.global_batch, trainer.generator, len(trainer.prompts))
        shape = (len(trainer.sampler.timesteps) + 1, *trainer.latent_shape)
        prompts, latents, log_probs, scores, gathered, members = [], [], [], [], [], {}
        for micro in range(config.grad_accum):
            first = (micro * world + trainer.rank) * batch
            rng = step_rng.view(slice(first, first + batch))
            micro_prompts = [trainer.prompts[i] for i in indices[rng.rows]]
            noise = rng.normal(shape).to(trainer.device)
            with trainer.autocast():
                with trainer.timer.phase("no-grad sampling"):
                    states, steps = self.rollout(micro_prompts, noise)
                with torch.no_grad(), trainer.timer.phase("reward"):
                    micro_scores = trainer.reward(trainer.sampler.decode(states[:, -1]), micro_prompts)
            trainer._check_scores(micro_scores, len(micro_prompts), differentiable=False)
            micro_scores = micro_scores.detach().float()
            prompts += micro_prompts
            latents.append(states)
            log_probs.append(steps)
            scores.append(micro_scores)
            gathered.append(distributed.gather(micro_scores))
            for key, value in getattr(trainer.reward, "last_scores", {}).items():
                members.setdefault(key, []).append(distributed.gather(value.detach().float()))
        all_scores = torch.cat(gathered)
        advantages = self.advantages([trainer.prompts[i] for i in indices], all_scores.cpu())
        clip = config.ddpo_adv_clip
        advantages = advantages.clamp(-clip, clip).to(trainer.device)
        firsts = [(micro * world + trainer.rank) * batch for micro in range(config.grad_accum)]
        mine = torch.cat([torch.arange(first, first + batch) for first in firsts])  # this process's rows
        return Round(
            prompts,
            torch.cat(latents),
            torch.cat(log_probs),
            torch.cat(scores),
            advantages[mine],
            mine,
            all_scores,
            {key: torch.cat(values) for key, values in members.items()},
        )

    def update(self, data: Round) -> dict[str, float]:
        """PPO on a round: ``ddpo_inner_epochs`` x ``ddpo_minibatches`` optimizer steps; returns their statistics
        (mean loss, fraction of clipped ratios, approximate KL to the sampling policy, last gradient norm)."""
        trainer, config = self.trainer, self.trainer.config
        positions = self.positions()
        if not positions:
            raise ValueError(
                f"no step of this {len(trainer.sampler.timesteps)}-step schedule is stochastic, so {self.name} has no "
                f"log-probability to train: raise --num-inference-steps"
            )
        trained = max(1, int(len(positions) * config.ddpo_timestep_fraction))
        rows = len(data.prompts)
        size = rows // config.ddpo_minibatches
        totals = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "kl": 0.0}
        count, losses, grad_norm = 0, [], 0.0
        for _ in range(config.ddpo_inner_epochs):
            order = self.shuffle(data.rows, len(data.all_scores))
            for m in range(config.ddpo_minibatches):
                chosen = order[m * size : (m + 1) * size]
                picked = torch.randperm(len(positions), generator=trainer.generator)[:trained]
                calls = [(chosen[s], positions[j]) for s in batch_slices(size, config.batch_size) for j in picked]
                trainer.optimizer.zero_grad(set_to_none=True)
                loss_value = 0.0
                for c, (chunk, index) in enumerate(calls):
                    with distributed.no_sync(trainer.model, skip=c < len(calls) - 1):
                        with trainer.autocast(), trainer.timer.phase("grad steps forward"):
                            log_prob, penalty = trainer.model(
                                [data.prompts[i] for i in chunk.tolist()],
                                data.latents[chunk, index],
                                data.latents[chunk, index + 1],
                                index,
                            )
                        surrogate, ratio = ppo_loss(
                            log_prob, data.log_probs[chunk, index], data.advantages[chunk], config.ddpo_clip_range
                        )
                        loss = (surrogate + config.grpo_kl_weight * penalty).sum() / (size * trained)
                        with trainer.timer.phase("grad steps backward"):
                            trainer.scaler.scale(loss).backward()
                    loss_value += loss.item()
                    delta = (log_prob - data.log_probs[chunk, index]).detach()
                    totals["clipfrac"] += ((ratio.detach() - 1).abs() > config.ddpo_clip_range).float().sum().item()
                    totals["approx_kl"] += (0.5 * delta**2).sum().item()
                    totals["kl"] += penalty.detach().sum().item()
                    count += len(chunk)
                loss_value = distributed.gather(torch.tensor([loss_value], device=trainer.device)).mean().item()
                losses.append(loss_value)
                grad_norm = trainer._optimizer_step(loss_value)
        stats = {key: value / count for key, value in totals.items() if key != "loss"}
        return {"loss": sum(losses) / len(losses), "grad_norm": grad_norm, **stats}

    def shuffle(self, rows: torch.Tensor, total: int) -> torch.Tensor:
        """A random order of this process's rows: their order in one permutation of the round's ``total`` rows,
        drawn alike on every process (so the draws do not depend on how the round is split over processes)."""
        permutation = torch.randperm(total, generator=self.trainer.generator)
        place = torch.empty_like(permutation)
        place[permutation] = torch.arange(total)
        return torch.argsort(place[rows])

    def warn_if_clipped(self, clipfrac: float) -> None:
        """Warn once (rank 0) when, over the last :data:`CLIPPING_ROUNDS` rounds, more than half of the ratios that
        can be clipped were (all but those of a round's first optimizer step, whose ratio is exactly 1): the policy
        then leaves the clip range within a round, so the round's later minibatches teach almost nothing. (In the
        embedded world, lr 1e-2 with the clip range 1e-4 clipped 70% of 75% and did not move the reward.)"""
        config = self.trainer.config
        clippable = 1 - 1 / (config.ddpo_inner_epochs * config.ddpo_minibatches)
        self.recent_clipfrac.append(clipfrac)
        if self.warned_clipping or self.trainer.rank != 0 or not clippable:
            return
        mean = statistics.mean(self.recent_clipfrac)
        if len(self.recent_clipfrac) == CLIPPING_ROUNDS and mean / clippable > 0.5:
            self.warned_clipping = True
            warnings.warn(
                f"{self.name}: {mean / clippable:.0%} of the PPO ratios that can be clipped were clipped over the last "
                f"{CLIPPING_ROUNDS} rounds (clipfrac {mean:.2f}): each update moves "
                f"the policy past the clip range ({config.ddpo_clip_range:g}), so the later minibatches of a round "
                f"teach almost nothing; lower --lr or raise --ddpo-clip-range",
                stacklevel=2,
            )

    def train_step(self) -> dict[str, Any]:
        """One round (a trainer step); returns its metrics."""
        trainer = self.trainer
        start = time.perf_counter()
        data = self.collect()
        stats = self.update(data)
        self.warn_if_clipped(stats["clipfrac"])
        queries = len(data.all_scores)
        trainer.step += 1
        trainer.images_seen += queries
        trainer.reward_queries += queries
        scores = data.all_scores
        metrics: dict[str, Any] = {
            "step": trainer.step,
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "loss": stats["loss"],
            "grad_norm": stats["grad_norm"],
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "sec_per_step": time.perf_counter() - start,
            "images_seen": trainer.images_seen,
            "reward_queries": trainer.reward_queries,
            "nonfinite_steps": trainer.nonfinite_steps,
            "clipfrac": stats["clipfrac"],
            "approx_kl": stats["approx_kl"],
        }
        if trainer.config.grpo_kl_weight > 0:
            metrics["kl"] = stats["kl"]
        for key, values in data.members.items():
            metrics[f"reward/{key}"] = values.mean().item()
        return metrics
