"""Training configuration: one dataclass, saved as and read from YAML; the CLI overrides a file's values."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from finetune.families import FamilyDefaults

DRAFT_METHOD_NAMES = ("draft", "draft-k", "draft-lv", "refl")
"""Methods that backpropagate the reward's gradient (they need a differentiable reward)."""
RL_METHOD_NAMES = ("ddpo", "grpo")
"""Policy-gradient methods (``finetune.rl``): any reward, as a black box."""
METHOD_NAMES = DRAFT_METHOD_NAMES + RL_METHOD_NAMES
MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION = ("sdpa", "eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs besides the pipeline and the reward objects.

    Defaults follow the DRaFT setup as reported (K = 1, LV n = 2, AdamW, LoRA on the denoiser's attention
    projections); learning rate, rank and weight decay are the values unofficial reproductions attribute to the
    paper. Resolution, sampling steps and guidance default to the model family's published usage (SD 1.x/2.x:
    512 px, 50 DDIM steps, guidance 7.5 as in DRaFT; see ``finetune.families``); the trainer fills them in
    (:meth:`with_defaults`), so ``training_config.yaml`` records the values used.
    """

    # What to train.
    model: str | None = None
    """Hub id or local diffusers directory (CLI only; Python callers pass a pipeline)."""
    reward: str = "aesthetic"
    """Reward name or weighted mix ``"aesthetic=1,brightness=0.5"`` (CLI only; Python callers pass a Reward)."""
    reward_normalize: bool = False
    reward_options: dict[str, Any] = field(default_factory=dict)
    """Options of a single reward, e.g. ``{"objective": "size"}`` for ``shapes`` (CLI: ``--option KEY=VALUE``)."""
    reward_weights: str | dict[str, str] | None = None
    """Local weights of a single reward: a path, or a path per component (CLI: ``--weights clip=DIR,head=FILE``)."""
    reward_random_weights: bool = False
    """Build the reward with random weights (CLI: ``--random-weights``; for tests, no download)."""
    method: str = "draft-k"
    k: int = 1
    lv_n: int = 2
    refl_range: tuple[float, float] = (0.75, 1.0)
    """ReFL: the no-grad prefix stops at a random fraction of the schedule in this range."""

    # RL methods (``finetune.rl``): a step is a round of batch_size x grad_accum trajectories per process, then PPO.
    ddpo_inner_epochs: int = 1
    """PPO passes over each round's trajectories (ddpo and grpo)."""
    ddpo_minibatches: int = 2
    """Optimizer steps per pass: the round is split into this many minibatches (ddpo and grpo)."""
    ddpo_clip_range: float = 1e-4
    """PPO's clip range of the importance ratio (DDPO's and Flow-GRPO's 1e-4)."""
    ddpo_adv_clip: float = 5.0
    """Advantages are clipped to [-adv_clip, adv_clip]."""
    ddpo_timestep_fraction: float = 1.0
    """Fraction of the sampling steps trained on per minibatch."""
    ddpo_eta: float = 1.0
    """DDIM's eta of DDPO's trajectories (evaluation samples with ``eta``)."""
    ddpo_buffer_size: int = 16
    """Rewards kept per prompt for DDPO's per-prompt normalisation."""
    ddpo_min_count: int = 16
    """A prompt with fewer kept rewards is normalised with the round's statistics (above buffer_size: always)."""
    grpo_group_size: int = 4
    """Samples per prompt in a round; advantages are relative to the group's mean and std."""
    grpo_noise_level: float = 0.7
    """``a`` of the SDE's noise ``sigma_t = a sqrt(t / (1 - t))`` (Flow-GRPO's 0.7)."""
    grpo_kl_weight: float = 0.0
    """Weight of the KL divergence of each step to the base model (the denoiser without LoRA); 0: none."""

    # Sampling (``None``: the model family's default).
    resolution: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    """Classifier-free guidance scale; FLUX.1-dev feeds it to its guidance embedding, FLUX.1-schnell ignores it."""
    eta: float = 0.0
    """DDIM's eta (SD 1.x/2.x and SDXL); flow-matching families need 0."""

    # LoRA.
    lora_rank: int = 8
    lora_alpha: float | None = None
    """Defaults to the rank (LoRA scale 1)."""
    lora_targets: tuple[str, ...] | None = None
    """Denoiser modules LoRA adapts (peft ``target_modules``); ``None``: the family's attention projections."""
    train_text_encoder: bool = False
    offload_text_encoders: bool = False
    """Keep the frozen text encoders on the CPU, moving them to the GPU only to encode a batch's prompts."""

    # Optimisation.
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 4e-4
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str | None = None
    """``no``, ``fp16`` or ``bf16``; default bf16 on CUDA, no on CPU."""
    gradient_checkpointing: bool = True
    checkpoint_decode: bool = False
    checkpoint_reward: bool = False
    """Recompute the reward's forward pass during backward instead of keeping its activations."""
    grad_chunk_size: int | None = None
    """Images per chunk in the gradient part of a step: the reward gradient is computed chunk by chunk through
    decode and reward, and checkpointed UNet steps recompute one chunk at a time, so peak memory follows the chunk,
    not the batch. ``None``: the whole batch at once."""

    # Speed (each option gives the same gradients as the plain path, within floating-point tolerance).
    compile_prefix: bool = False
    """Run the no-grad sampling steps through ``torch.compile(unet)`` (compiles on the first step)."""
    compile_mode: str = "default"
    """``torch.compile`` mode for the prefix, e.g. ``reduce-overhead`` for CUDA graphs."""
    channels_last: bool = False
    """UNet and VAE weights in channels-last memory format (faster convolutions on recent GPUs)."""
    attention: str = "sdpa"
    """``sdpa`` (``scaled_dot_product_attention``: fused kernels, no stored attention matrix) or ``eager``."""
    allow_tf32: bool = True
    """TF32 for float32 matmuls and convolutions on CUDA (leftover fp32 work under mixed precision)."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient."""

    # Data.
    prompts: str = "animals"
    """A built-in prompt set name or a text file with one prompt per line."""
    eval_prompts: str = "eval"
    eval_seeds: tuple[int, ...] = (0, 1)

    # Outputs.
    output_dir: str = "outputs/draft"
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    """Replace an earlier run's outputs in ``output_dir`` (a non-empty directory is refused otherwise)."""
    device: str | None = None

    # Over-optimisation guards (finetune.guards, finetune.diversity).
    eval_rewards: tuple[str, ...] | None = None
    """Judges: reward names or mixes scored on the held-out prompts at every evaluation, never trained on.
    ``None``: on the command line, the defaults of :func:`finetune.guards.default_eval_rewards`; in Python, none
    (or pass ``judges`` to the trainer)."""
    diversity_warn: float = 0.5
    """Warn when the held-out diversity falls below this fraction of the base model's (step 0); 0: never."""
    early_stop: str | None = None
    """``judge=NAME,patience=N,drop=X``: stop when metric NAME (a judge, ``reward`` or ``diversity``) has been more
    than X below its best for N evaluations in a row; the final LoRA is the best one."""
    anchor_weight: float = 0.0
    """Weight of the anchor penalty: mean squared difference between the LoRA model's and the base model's
    predictions at the sampled grad steps (one extra no-grad denoiser call per grad step). Together with
    ``weight_decay`` (AdamW's decoupled decay, which acts on the LoRA factors only and so pulls the model toward the
    base model), it keeps the fine-tuned model near the base model."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes kept in training_config.yaml (e.g. the command line)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        if self.method not in METHOD_NAMES:
            close = difflib.get_close_matches(self.method, METHOD_NAMES, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown method '{self.method}'.{hint} Choose from {', '.join(METHOD_NAMES)}.")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1; got {self.num_inference_steps}")
        if self.method == "draft-k" and not 1 <= self.k <= (self.num_inference_steps or self.k):
            raise ValueError(
                f"K = {self.k} must be between 1 and the number of sampling steps ({self.num_inference_steps})"
            )
        if self.lv_n < 1:
            raise ValueError(f"lv_n must be at least 1; got {self.lv_n}")
        low, high = self.refl_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"refl_range must satisfy 0 <= low <= high <= 1; got {self.refl_range}")
        if self.resolution is not None and (self.resolution % 8 != 0 or self.resolution <= 0):
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of 8 (the VAE's factor)")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {self.mixed_precision}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}; got {self.attention!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}")
        if self.offload_text_encoders and self.train_text_encoder:
            raise ValueError("offload_text_encoders keeps frozen encoders off the GPU; it cannot train one")
        if self.grad_chunk_size is not None and self.grad_chunk_size < 1:
            raise ValueError(f"grad_chunk_size must be at least 1 (or None: whole batch); got {self.grad_chunk_size}")
        if not 0.0 <= self.diversity_warn < 1.0:
            raise ValueError(f"diversity_warn must be a fraction in [0, 1); got {self.diversity_warn}")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be at least 0; got {self.anchor_weight}")
        if self.early_stop is not None:
            from finetune.guards import EarlyStopSpec

            EarlyStopSpec.parse(self.early_stop)
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.method in RL_METHOD_NAMES:
            self._validate_rl()

    def _validate_rl(self) -> None:
        for name in ("ddpo_inner_epochs", "ddpo_minibatches", "ddpo_buffer_size", "grpo_group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        for name in ("ddpo_clip_range", "ddpo_adv_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if not 0 < self.ddpo_timestep_fraction <= 1:
            raise ValueError(f"ddpo_timestep_fraction must be in (0, 1]; got {self.ddpo_timestep_fraction}")
        rows = self.batch_size * self.grad_accum
        if rows % self.ddpo_minibatches:
            raise ValueError(
                f"ddpo_minibatches {self.ddpo_minibatches} must divide the {rows} trajectories a round samples per "
                f"process (batch_size x grad_accum): change --ddpo-minibatches or --batch-size/--grad-accum"
            )
        if self.method == "ddpo" and self.ddpo_eta <= 0:
            raise ValueError(
                f"ddpo_eta must be positive; got {self.ddpo_eta} (DDPO's policy is stochastic DDIM; eta 0 is "
                f"deterministic and has no log-probability)"
            )
        if self.method == "grpo":
            if self.grpo_group_size < 2 or rows % self.grpo_group_size:
                raise ValueError(
                    f"grpo_group_size {self.grpo_group_size} must be at least 2 and divide the {rows} trajectories "
                    f"a round samples per process (batch_size x grad_accum)"
                )
            if self.grpo_noise_level <= 0:
                raise ValueError(f"grpo_noise_level must be positive; got {self.grpo_noise_level}")
            if self.grpo_kl_weight < 0:
                raise ValueError(f"grpo_kl_weight must be at least 0; got {self.grpo_kl_weight}")
            if self.grpo_kl_weight > 0 and self.train_text_encoder:
                raise ValueError("grpo_kl_weight compares with the base denoiser; it cannot train the text encoder")
        if self.anchor_weight > 0:
            raise ValueError(
                f"anchor_weight anchors the reward-gradient methods' grad steps; {self.method} has none (its loss is "
                f"the PPO objective): leave it at 0, and use --grpo-kl-weight to keep grpo near the base model"
            )

    def with_defaults(self, defaults: FamilyDefaults) -> TrainConfig:
        """This configuration with the unset sampling settings taken from a model family's defaults."""
        return self.replace(
            **{
                name: getattr(defaults, name)
                for name in ("resolution", "num_inference_steps", "guidance_scale")
                if getattr(self, name) is None
            }
        )

    @property
    def effective_k(self) -> int:
        """Number of sampling steps that keep the graph."""
        return {"draft": self.num_inference_steps, "draft-k": self.k}.get(self.method, 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def save(self, path: str | Path) -> None:
        """Write as YAML (atomically)."""
        from finetune.checkpoint import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            hints = [f"{u} (did you mean {difflib.get_close_matches(u, names, n=1)})" for u in unknown]
            raise ValueError(f"unknown configuration key(s): {', '.join(hints)}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(cls.read_settings(path))

    @staticmethod
    def read_settings(path: str | Path) -> dict[str, Any]:
        """The settings a YAML file gives, as written (defaults not filled in, so that they do not override a
        model's preset)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings")
        return values

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
