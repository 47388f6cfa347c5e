"""The training loop, top to bottom: prompts -> text embeddings -> sampling (no-grad prefix, grad steps) ->
decode -> reward -> loss -> LoRA update -> metrics, grids, checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from finetune import distributed
from finetune.checkpoint import (
    latest_checkpoint,
    load_best_lora,
    load_checkpoint,
    require_checkpoint,
    save_checkpoint,
)
from finetune.config import TrainConfig
from finetune.guards import RUN_END_KEY, Anchor, EvaluationGuards, build_judges
from finetune.interrupt import StopOnSignal, TrainingInterrupted
from finetune.lora import LORA_WEIGHTS_NAME, save_lora_weights
from finetune.methods import METHODS, BatchRandom, Generated, MethodSettings
from finetune.outputs import claim_output_dir
from finetune.pipelines import check_pipeline
from finetune.prompts import load_prompts
from finetune.rl import policy_gradient
from finetune.sampling import Conditioning, Sampler, batch_slices, generate
from finetune.speed import compile_prefix, set_attention, set_channels_last, set_tf32
from finetune.timing import PhaseTimer
from finetune.tracking import MetricsLog, save_grid

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
RUN_ARTEFACTS = (
    "metrics.jsonl",
    "tensorboard",
    "samples",
    "checkpoints",
    "training_config.yaml",
    LORA_WEIGHTS_NAME,
    "report.html",
)
"""What a run writes in its output directory (what ``overwrite`` replaces)."""
Callback = Callable[["Trainer", dict[str, Any]], None]


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Trainer:
    """Fine-tunes LoRA adapters of a pipeline's denoiser (UNet or transformer; optionally also its first text
    encoder) on a reward, for every supported model family (:mod:`finetune.families`).

    ``Trainer(pipeline, reward, config).train()``. The pipeline is modified in place (LoRA adapters are added), so
    after training ``pipeline(prompt)`` samples from the fine-tuned model. ``callbacks`` are called after every
    step with ``(trainer, metrics)``; set ``trainer.should_stop = True`` in one to end training early. ``judges``
    (name -> reward) are scored at every evaluation and never trained on; by default they are built from
    ``config.eval_rewards`` (:mod:`finetune.guards`).
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        reward: Callable[[torch.Tensor, list[str]], torch.Tensor],
        config: TrainConfig,
        prompts: Sequence[str] | None = None,
        eval_prompts: Sequence[str] | None = None,
        callbacks: Sequence[Callback] = (),
        judges: Mapping[str, Callable[[torch.Tensor, list[str]], torch.Tensor]] | None = None,
    ) -> None:
        self.family = check_pipeline(pipeline)
        config = config.with_defaults(self.family.defaults)
        config.validate()
        self.config = config
        self.pipeline = pipeline
        self.reward = reward
        self.callbacks = list(callbacks)
        if judges is None:
            judges = build_judges(config.eval_rewards or (), pretrained=not config.reward_random_weights)
        self.judges = dict(judges)
        self.should_stop = False
        self.prompts = list(prompts) if prompts is not None else load_prompts(config.prompts)
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else load_prompts(config.eval_prompts)
        if not self.prompts:
            raise ValueError("no training prompts given")
        self.output_dir = Path(config.output_dir)

        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world, self.device = distributed.setup(device)
        with distributed.fail_together():  # a rank that fails to set up ends the others (no hang in DDP's set-up)
            self._set_up()

    def _set_up(self) -> None:
        config, pipeline = self.config, self.pipeline
        if self.device.type == "cuda":
            set_tf32(config.allow_tf32)
        precision = config.mixed_precision or ("bf16" if self.device.type == "cuda" else "no")
        self.autocast_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        multiple = self.family.resolution_multiple
        if config.resolution % multiple:
            raise ValueError(
                f"resolution {config.resolution} is not divisible by {multiple} (the {self.family.title} latent "
                f"factor); choose a multiple of {multiple}"
            )

        self._add_lora()
        # Frozen weights in the compute precision on GPU (memory); trainable LoRA weights always in fp32.
        weight_dtype = self.autocast_dtype if self.device.type == "cuda" and self.autocast_dtype else torch.float32
        offloaded = self.family.text_encoders() if config.offload_text_encoders else []
        for module in self.family.components():  # offloaded text encoders stay on the CPU between encodings
            module.to("cpu" if any(module is encoder for encoder in offloaded) else self.device)
        if weight_dtype != torch.float32:
            pipeline.to(dtype=weight_dtype)
        trained = ((self.family.denoiser_name, self.family.denoiser), ("text_encoder", pipeline.text_encoder))
        self.named_params = {
            f"{prefix}.{name}": p
            for prefix, module in trained
            for name, p in module.named_parameters()
            if p.requires_grad
        }
        for p in self.named_params.values():
            p.data = p.data.float()
        set_attention(self.family, config.attention)
        if config.channels_last:
            set_channels_last(self.family)
        for scorer in (self.reward, *self.judges.values()):
            if isinstance(scorer, torch.nn.Module):
                scorer.to(self.device)
        self.guards = EvaluationGuards(self.judges, self.reward, config.diversity_warn, config.early_stop, self.device)
        self.early_stopped = False
        self.kept_note: str | None = None
        """What early stopping kept, as the run reports it."""
        self.evaluations: dict[str, tuple[int, torch.Tensor]] = {}
        """The first and last evaluations' (step, images) in this process, for the run report."""
        self.eval_seconds = 0.0
        modules = {self.family.denoiser_name: self.family.denoiser}
        if config.train_text_encoder:
            modules["text_encoder"] = pipeline.text_encoder
        self.rl = policy_gradient(self)
        """The RL method (``ddpo``, ``grpo``; :mod:`finetune.rl`), or ``None`` for the DRaFT-family methods."""
        self.model = distributed.data_parallel(SamplingModel(modules, self.rl.forward if self.rl else self._sample))
        """What one micro-batch's forward runs (text encoding and the method's sampling), DDP-wrapped when data
        parallel: one forward and one backward per micro-batch, whatever the method's number of denoiser calls.
        (An RL method's forward is one transition's log-probability: see ``finetune.rl.policy``.)"""

        self.optimizer = torch.optim.AdamW(
            list(self.named_params.values()), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.timer = PhaseTimer(self.device)
        """Per-phase timing of the training step, off unless enabled (``benchmarks/step_breakdown.py``)."""
        self.sampler = Sampler(
            family=self.family,
            resolution=config.resolution,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            eta=config.eta,
            checkpoint_unet=config.gradient_checkpointing,
            checkpoint_decode=config.checkpoint_decode,
            chunk_size=config.grad_chunk_size,
            prefix_unet=compile_prefix(self.family.denoiser, config.compile_mode) if config.compile_prefix else None,
            timer=self.timer,
            offload_text_encoders=config.offload_text_encoders,
        )
        if config.anchor_weight > 0:
            family, sampler = self.family, self.sampler
            sampler.anchor = Anchor(
                [family.denoiser], lambda *inputs: family.guided(family.denoiser, *inputs, sampler.guidance_scale)
            )
        self._anchor_penalties: list[float] = []
        self.method = METHODS.get(config.method)
        self.settings = MethodSettings(config.k, config.lv_n, tuple(config.refl_range))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.images_seen = 0
        self.reward_queries = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0

    # ----------------------------------------------------------------------------------------------- set-up
    def _add_lora(self) -> None:
        config = self.config
        alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
        for module in self.family.components():
            module.requires_grad_(False).eval()
        with torch.random.fork_rng(devices=[]):  # the LoRA initialisation depends on the seed only
            torch.manual_seed(config.seed)
            self._add_adapters(alpha)

    def _add_adapters(self, alpha: float) -> None:
        config = self.config
        self.family.denoiser.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=alpha,
                init_lora_weights="gaussian",
                target_modules=list(config.lora_targets or self.family.lora_targets),
            )
        )
        if config.train_text_encoder:
            self.pipeline.text_encoder.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(TEXT_ENCODER_TARGETS),
                )
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one image's initial noise (the family's latent shape at the configured resolution)."""
        return self.sampler.latent_shape

    def _conditioning(self, prompts: Sequence[str]) -> Conditioning:
        with torch.set_grad_enabled(self.config.train_text_encoder and torch.is_grad_enabled()):
            return self.sampler.encode(prompts)

    # ------------------------------------------------------------------------------------------------- step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step (``grad_accum`` micro-batches); returns its metrics. (An RL method's step is one
        round: sampling, rewards, then its PPO optimizer steps.)"""
        if self.rl is not None:
            return self.rl.train_step()
        config = self.config
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        all_scores: list[torch.Tensor] = []
        members: dict[str, list[torch.Tensor]] = {}
        loss_value = 0.0
        batch = config.batch_size
        # The step's random draws are made once for its global batch (micro-batch-major, then rank) and sliced, so
        # they do not depend on how the step is split into micro-batches and processes.
        step_rng = BatchRandom(self.generator, batch * self.world * config.grad_accum)
        indices = torch.randint(len(self.prompts), (step_rng.global_batch,), generator=self.generator)
        for micro in range(config.grad_accum):
            first = (micro * self.world + self.rank) * batch
            rng = step_rng.view(slice(first, first + batch))
            prompts = [self.prompts[i] for i in indices[rng.rows]]
            noise = rng.normal(self.latent_shape).to(self.device)
            try:
                with distributed.no_sync(self.model, skip=micro < config.grad_accum - 1):
                    scores, member_scores = self.backward(prompts, noise, rng, 1.0 / config.grad_accum)
            except torch.OutOfMemoryError as err:
                raise torch.OutOfMemoryError(
                    f"out of memory in a {config.method} step (batch {config.batch_size}, K {config.effective_k}, "
                    f"resolution {config.resolution}): lower --grad-chunk-size (e.g. 1: peak memory then follows "
                    f"one image, not the batch), keep gradient checkpointing on, lower --k, or lower --batch-size "
                    f"and raise --grad-accum to keep the effective batch"
                ) from err
            loss_value += -scores.mean().item() / config.grad_accum
            all_scores.append(distributed.gather(scores))
            for key, value in member_scores.items():
                members.setdefault(key, []).append(distributed.gather(value.float()))
            self.reward_queries += len(scores) * self.world
        self.images_seen += batch * self.world * config.grad_accum
        anchor = None
        if self._anchor_penalties:
            anchor = sum(self._anchor_penalties) / len(self._anchor_penalties)
            self._anchor_penalties = []
            loss_value += config.anchor_weight * anchor
            anchor = distributed.gather(torch.tensor([anchor], device=self.device)).mean().item()
        loss_value = distributed.gather(torch.tensor([loss_value], device=self.device)).mean().item()
        grad_norm = self._optimizer_step(loss_value)
        self.step += 1

        scores = torch.cat(all_scores)
        metrics: dict[str, Any] = {
            "step": self.step,
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "sec_per_step": time.perf_counter() - start,
            "images_seen": self.images_seen,
            "reward_queries": self.reward_queries,
            "nonfinite_steps": self.nonfinite_steps,
        }
        for key, values in members.items():
            metrics[f"reward/{key}"] = torch.cat(values).mean().item()
        if anchor is not None:
            metrics["anchor"] = anchor
        return metrics

    def _optimizer_step(self, loss_value: float) -> float:
        """Apply the accumulated gradients (clipped) unless the loss (the same on every rank) or the gradient norm
        is not finite; return the gradient norm. Raises after ``max_nonfinite_steps`` skipped steps in a row."""
        config = self.config
        with self.timer.phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.named_params.values()), config.max_grad_norm))
            if math.isfinite(loss_value) and (math.isfinite(grad_norm) or self.scaler.is_enabled()):
                self.scaler.step(self.optimizer)
                self.consecutive_nonfinite = 0
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_steps += 1
                self.consecutive_nonfinite += 1
                warnings.warn(
                    f"step {self.step + 1}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); "
                    f"skipped ({self.consecutive_nonfinite} in a row)",
                    stacklevel=3,
                )
            self.scaler.update()
        if self.consecutive_nonfinite >= config.max_nonfinite_steps:
            raise TrainingDivergedError(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient (last at step "
                f"{self.step + 1}); stopping. The last good checkpoint is intact: lower --lr, use bf16 instead of "
                f"fp16, or lower --max-grad-norm, then --resume."
            )
        return grad_norm

    def backward(
        self, prompts: list[str], noise: torch.Tensor, rng: BatchRandom, weight: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Accumulate the gradient of ``-weight * mean(reward)`` over one micro-batch into the trainable
        parameters; return the (detached, float32) scores and, for a mix, each member's scores.

        Two phases. The method builds the graph from the noise to the clean latents. Decode and reward then run
        ``grad_chunk_size`` images at a time, each chunk giving the reward's gradient with respect to its latents
        (so one chunk's decode and reward activations are alive at a time), and one backward carries the
        gathered gradients through the grad steps (whose checkpointed UNet calls recompute a chunk at a time).
        """
        with self.autocast():
            generated = self.model(prompts, noise, rng)
        latents = generated.latents
        if not latents.requires_grad:
            raise RuntimeError(f"the {self.config.method} sampling graph reaches no trainable parameter")
        image_prompts = [prompts[i] for i in generated.prompt_index.tolist()]
        anchor_weight = weight * self.config.anchor_weight
        weight = weight / len(latents)
        gradients, scores, members = [], [], {}
        for rows in batch_slices(len(latents), self.config.grad_chunk_size):
            chunk = latents[rows].detach().requires_grad_()
            with self.autocast():
                with self.timer.phase("decode"):
                    images = self.sampler.decode(chunk)
                with self.timer.phase("reward"):
                    chunk_scores = self._score(images, image_prompts[rows])
            self._check_scores(chunk_scores, len(chunk))
            with self.timer.phase("decode+reward backward"):
                loss = -chunk_scores.float().sum() * weight
                gradients.append(torch.autograd.grad(self.scaler.scale(loss), chunk)[0])
            scores.append(chunk_scores.detach().float())
            for key, value in getattr(self.reward, "last_scores", {}).items():
                members.setdefault(key, []).append(value)
        penalty = self.sampler.anchor.pop() if self.sampler.anchor is not None else None
        with self.timer.phase("grad steps backward"):
            if penalty is None:
                latents.backward(torch.cat(gradients))
            else:  # the anchor penalty's gradient joins the reward's in the one backward through the grad steps
                self._anchor_penalties.append(penalty.item())
                torch.autograd.backward(
                    [latents, self.scaler.scale(penalty * anchor_weight)], [torch.cat(gradients), None]
                )
        return torch.cat(scores), {key: torch.cat(values) for key, values in members.items()}

    def _sample(self, prompts: list[str], noise: torch.Tensor, rng: BatchRandom) -> Generated:
        with self.timer.phase("text encoder"):
            conditioning = self._conditioning(prompts)
        return self.method(self.sampler, conditioning, noise, self.settings, rng)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.config.checkpoint_reward:
            return checkpoint(self.reward, images, prompts, use_reentrant=False)
        return self.reward(images, prompts)

    def _check_scores(self, scores: object, expected: int, differentiable: bool = True) -> None:
        name = getattr(self.reward, "name", type(self.reward).__name__)
        if not isinstance(scores, torch.Tensor) or scores.shape != (expected,):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"reward '{name}' returned {shape}; expected a tensor of shape ({expected},)")
        if differentiable and not scores.requires_grad:
            raise ValueError(
                f"reward '{name}' is not differentiable: its scores carry no gradient to the images (does it use "
                f"torch.no_grad, .detach(), .item(), numpy or PIL?). DRaFT needs a differentiable reward; the RL "
                f"methods (method 'ddpo' or 'grpo') take any reward."
            )

    # ------------------------------------------------------------------------------------------- evaluation
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """Images [len(prompts) * len(seeds), 3, H, W] in [0, 1] from the current model with fixed seeds (each
        rank renders its share; every rank returns them all)."""
        return self._sharded(prompts, seeds)[0]

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """Mean reward on held-out prompts and fixed seeds; returns ``{"eval_reward": ..., "images": ...}``,
        with each judge's mean (``judge/NAME``) and the diversity across seeds (:mod:`finetune.diversity`).

        With several processes each renders and scores every ``world``-th image; the results are gathered (on
        every rank), so the metrics and images are one process's."""
        prompts = list(prompts if prompts is not None else self.eval_prompts)
        seeds = list(seeds if seeds is not None else self.config.eval_seeds)
        images, scores = self._sharded(prompts, seeds, score=True)
        reward = scores.pop("eval_reward")
        result = {"eval_reward": reward.mean().item(), "eval_reward_std": reward.std().item()}
        return {**result, **self.guards.metrics(images, len(seeds), scores), "images": images}

    @torch.no_grad()
    def _sharded(
        self, prompts: Sequence[str], seeds: Sequence[int], score: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's share of the images (and, with ``score``, the training reward's scores as ``eval_reward``
        and each judge's by name), gathered from every rank in one process's order."""
        shard = (self.rank, self.world)
        total = len(prompts) * len(seeds)
        scorers = {"eval_reward": self.reward, **self.judges} if score else {}
        images, scores = None, {}
        if self.rank < total:
            images = generate(self.sampler, prompts, seeds, self.config.batch_size, self.device, self.autocast, shard)
        if images is not None and scorers:
            image_prompts = [p for p in prompts for _ in seeds][self.rank :: self.world]
            parts: dict[str, list[torch.Tensor]] = {key: [] for key in scorers}
            for rows in batch_slices(len(images), self.config.batch_size):
                batch = images[rows].to(self.device)
                with self.autocast():
                    for key, scorer in scorers.items():
                        parts[key].append(scorer(batch, image_prompts[rows]).float().cpu())
            scores = {key: torch.cat(values) for key, values in parts.items()}
        shares = distributed.gather_objects((images, scores))
        gathered_images = torch.empty((total, *shares[0][0].shape[1:]), dtype=shares[0][0].dtype)
        gathered_scores = {key: torch.empty(total) for key in scorers}
        for rank, (part_images, part_scores) in enumerate(shares):
            if part_images is not None:
                gathered_images[rank :: self.world] = part_images
            for key, values in part_scores.items():
                gathered_scores[key][rank :: self.world] = values
        return gathered_images, gathered_scores

    def _evaluate_and_save(self) -> dict[str, Any]:
        """Evaluate (every rank, sharded); rank 0 writes the grid. The guards see the result (diversity warning,
        early stopping: every rank decides alike, on the gathered metrics)."""
        start = time.perf_counter()
        result = self.evaluate()
        images = result.pop("images")
        if self.rank == 0:
            path = self.output_dir / "samples" / f"step_{self.step:06d}.png"
            save_grid(images, path, len(self.config.eval_seeds), self.eval_prompts)
        self.evaluations.setdefault("first", (self.step, images))
        self.evaluations["last"] = (self.step, images)
        if self.guards.observe(self.step, result, self.named_params):
            self.should_stop = self.early_stopped = True
        self.eval_seconds += time.perf_counter() - start
        return result

    # -------------------------------------------------------------------------------------- checkpointing
    def save_checkpoint(self) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "guards": self.guards.state_dict(),
        }
        if self.rl is not None:
            state["rl"] = self.rl.state_dict()
        meta = {
            "images_seen": self.images_seen,
            "reward_queries": self.reward_queries,
            "nonfinite_steps": self.nonfinite_steps,
        }
        lora = {name: p.detach() for name, p in self.named_params.items()}
        return save_checkpoint(
            self.output_dir / "checkpoints",
            self.step,
            lora,
            state,
            meta,
            self.config.keep_checkpoints,
            self.guards.best_parameters(),
        )

    def resume(self) -> Path:
        """Restore the latest checkpoint in ``output_dir/checkpoints``."""
        path = require_checkpoint(self.output_dir / "checkpoints")
        lora, state, meta = load_checkpoint(path)
        if set(lora) != set(self.named_params):
            raise ValueError(
                f"checkpoint {path} holds different LoRA parameters than this configuration (rank, targets or "
                f"text-encoder training changed?)"
            )
        with torch.no_grad():
            for name, p in self.named_params.items():
                p.copy_(lora[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        if self.rl is not None:
            self.rl.load_state_dict(state.get("rl", {}))
        self.guards.load_state_dict(state.get("guards", {}), load_best_lora(path))
        self.step = meta["step"]
        self.images_seen = meta["images_seen"]
        self.reward_queries = meta["reward_queries"]
        self.nonfinite_steps = meta["nonfinite_steps"]
        return path

    def save_lora(self, directory: str | Path | None = None) -> Path:
        """Write the LoRA so that ``pipeline.load_lora_weights(directory)`` loads it."""
        return save_lora_weights(self.family, Path(directory or self.output_dir), self.config.train_text_encoder)

    # --------------------------------------------------------------------------------------------- the loop
    def train(self) -> list[dict[str, Any]]:
        """Run to ``config.steps``; returns the metrics of every step run.

        A first Ctrl-C or SIGTERM ends the run after the current step with a checkpoint and raises
        :class:`~finetune.interrupt.TrainingInterrupted` (see ``finetune.interrupt``)."""
        config = self.config
        main = self.rank == 0
        started = time.perf_counter()
        if main:
            claim_output_dir(self.output_dir, RUN_ARTEFACTS, config.resume, config.overwrite)
        if config.resume:
            self.resume()
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / "training_config.yaml")
        log = MetricsLog(self.output_dir) if main else None
        history = []
        saved_step = self.step
        run_name = f"{self.output_dir.name} ({config.method})"
        bar = tqdm(total=config.steps, initial=self.step, desc=run_name, unit="step", disable=not main)
        with StopOnSignal() as stop, distributed.fail_together():
            try:
                if log is not None:
                    log.truncate(self.step, RUN_END_KEY)
                if self.step == 0:
                    evaluation = {"step": 0, **self._evaluate_and_save()}
                    if log is not None:
                        log.log(evaluation)
                interrupted = False
                while self.step < config.steps and not self.should_stop:
                    interrupted = distributed.any_rank(stop.received is not None)  # every rank stops together
                    if interrupted:
                        break
                    metrics = self.train_step()
                    if self.step % config.eval_every == 0 or self.step == config.steps:
                        metrics.update(self._evaluate_and_save())
                    if log is not None:
                        log.log(metrics)
                    history.append(metrics)
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward']:.4g}", s_step=f"{metrics['sec_per_step']:.2f}")
                    for callback in self.callbacks:
                        callback(self, metrics)
                    due = self.step % config.checkpoint_every == 0 or self.step == config.steps
                    if main and due and self.consecutive_nonfinite == 0:  # keep good checkpoints through NaNs
                        self.save_checkpoint()
                        saved_step = self.step
                if interrupted:
                    self._stop_on_signal(stop.received or signal.SIGTERM, saved_step)
                self._keep_best(log)
            finally:
                bar.close()
                if log is not None:
                    log.close()
        if main:
            self.save_lora()
            self._write_report(time.perf_counter() - started)
        return history

    def _keep_best(self, log: MetricsLog | None) -> None:
        """With early stopping: make the best LoRA by the followed metric the final one, and say so."""
        early = self.guards.early_stopping
        if early is None or early.best_step is None:
            return
        if early.best_step != self.step:
            early.restore(self.named_params)
        summary = {**early.summary(self.step), "early_stopped": self.early_stopped}
        how = "stopped early at" if self.early_stopped else "ran to"
        message = (
            f"early stopping on {summary['early_stop_metric']}: {how} step {self.step}; the final LoRA is the best "
            f"one, from step {early.best_step} ({summary['early_stop_metric']} = {early.best:.4g})"
        )
        self.kept_note = message
        if log is not None:
            log.log(summary)
            print(message, flush=True)

    def _write_report(self, seconds: float) -> None:
        """``report.html``: a failure is a warning, never the end of a finished run."""
        from finetune.report_html import training_report

        try:
            lines = (self.output_dir / "metrics.jsonl").read_text().splitlines()
            history = [json.loads(line) for line in lines if line]
            steps = [r["sec_per_step"] for r in history if "sec_per_step" in r]
            timings = {
                "this session (wall)": seconds,
                "mean training step": sum(steps) / len(steps) if steps else float("nan"),
                "evaluations (this session)": self.eval_seconds,
            }
            notes = [self.kept_note] if self.kept_note else []
            if self.guards.base_diversity is not None:
                notes.append(f"Diversity is measured in {self.guards.space.name}.")
            first, last = self.evaluations.get("first"), self.evaluations.get("last")
            report = training_report(
                f"{self.output_dir.name}: {self.config.method} on {getattr(self.reward, 'name', self.config.reward)}",
                history,
                self.eval_prompts,
                len(self.config.eval_seeds),
                first if first is not None and first[0] == 0 else None,
                last,
                self.config.to_dict(),
                notes,
                timings,
            )
            report.write(self.output_dir / "report.html")
        except Exception as err:  # the LoRA and metrics are the results; a page must never throw them away
            warnings.warn(f"report.html not written ({type(err).__name__}: {err})", stacklevel=2)

    def _stop_on_signal(self, signum: int, saved_step: int) -> None:
        """Checkpoint the steps run since the last checkpoint (rank 0), then raise ``TrainingInterrupted``."""
        checkpoints = self.output_dir / "checkpoints"
        if self.rank == 0 and self.step > saved_step and self.consecutive_nonfinite == 0:
            self.save_checkpoint()
        raise TrainingInterrupted(signum, self.step, latest_checkpoint(checkpoints))


class SamplingModel(torch.nn.Module):
    """The trained networks (the denoiser; the text encoder when it is trained) as one module whose forward is
    ``sample(prompts, noise, rng)``: text encoding and a method's sampling up to the clean latents (for an RL
    method, ``sample`` is its one-transition log-probability, :meth:`finetune.rl.PolicyGradient.forward`).

    This is the unit DDP wraps. However many denoiser calls a method makes (no-grad prefix, checkpointed grad
    steps recomputed in backward, DRaFT-LV copies), a micro-batch is one DDP forward, and the one
    ``latents.backward`` of :meth:`Trainer.backward` is its backward, during which each parameter's gradient is
    ready once and the buckets are all-reduced.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], sample: Callable[..., Any]) -> None:
        super().__init__()
        self.trained = torch.nn.ModuleDict(modules)
        self.sample = sample

    def forward(self, *args: Any) -> Any:
        return self.sample(*args)
