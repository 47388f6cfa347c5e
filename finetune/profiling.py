"""Where a training step's time and FLOPs go: per-phase timers, FLOP counts and the FLOP lower bound.

:func:`profile_step` times a trainer's step phase by phase with its :class:`~finetune.timing.PhaseTimer` and
counts each phase's FLOPs.

The cost model follows ``shared/reference/PERFORMANCE.md``: a step's minimum work is every forward once plus, for
the parts that keep the graph, one backward of about the forward's cost (frozen weights need input gradients
only; no recomputation), built from the forward FLOPs of one denoiser evaluation (UNet or transformer), one VAE
decode, one reward call and one text encoding (:func:`component_flops`). Divided by the device's peak rate it is
the step's time floor.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from finetune.families import family_for
from finetune.methods import refl_stop_range
from finetune.timing import PhaseTimer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from finetune.config import TrainConfig
    from finetune.trainer import Trainer

PHASES = (
    "text encoder",
    "no-grad sampling",
    "grad steps forward",
    "decode",
    "reward",
    "decode+reward backward",
    "grad steps backward",
    "optimizer",
)
"""Every phase of a training step, in the order they run."""

SPEC_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
}
"""Dense BF16 peak FLOP/s by device-name fragment, first match wins (PERFORMANCE.md; NVIDIA data sheets)."""


def count_flops(function: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call (matmuls, convolutions and attention; 1 multiply-add = 2 FLOPs). Works on the meta
    device, so the cost of a full-size model can be counted without computing it."""
    with FlopCounterMode(display=False) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


def spec_peak_flops(device: torch.device | str) -> float | None:
    """The data-sheet dense BF16 peak of a known CUDA device, else ``None``."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in SPEC_PEAK_FLOPS.items() if fragment in name), None)


def measured_peak_flops(
    device: torch.device | str, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> float:
    """FLOP/s of the fastest of ``repeats`` square matmuls of side ``size``: the rate this device reaches on the
    kindest possible work, the ceiling the step is compared with when no data-sheet peak is known."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timer = PhaseTimer(device, enabled=True)
    best = float("inf")
    for _ in range(repeats):
        timer.reset()
        with timer.phase("matmul"):
            a @ b
        best = min(best, timer.seconds["matmul"])
    return 2 * size**3 / best


def component_flops(
    pipeline: DiffusionPipeline, reward: Callable[..., torch.Tensor], resolution: int
) -> dict[str, int]:
    """Forward FLOPs per image of each component, as the family's sampler calls them: one denoiser evaluation
    (one guidance branch), one VAE decode, one reward call, one text encoding (every text encoder of the family).
    Build the pipeline and reward on the meta device to count a full-size model in a second without computing
    it."""
    family = family_for(pipeline)
    device = family.device
    solver = family.solver(1, resolution)
    latents = family.initial_latents(torch.zeros(1, *family.latent_shape(resolution), device=device), solver)
    images = torch.zeros(1, 3, resolution, resolution, device=device)
    score = getattr(reward, "compute", reward)  # a Reward's unvalidated path (validation reads values)
    with torch.no_grad():
        conditioning = family.encode(["a photo"], 1.0, resolution)
        return {
            "denoiser": count_flops(
                family.predict,
                family.denoiser,
                latents,
                solver.timesteps[0],
                conditioning.cond,
                conditioning.shared,
                family.defaults.guidance_scale,
            ),
            "decode": count_flops(family.decode, latents, resolution),
            "reward": count_flops(score, images, ["a photo"]),
            "text encoder": count_flops(family.encode, ["a photo"], 1.0, resolution),
        }


@dataclass(frozen=True)
class StepWork:
    """How many times a training step runs each component, per image count (one denoiser evaluation = one image,
    one guidance branch)."""

    denoiser_no_grad: float
    denoiser_grad: float
    decodes: float
    rewards: float
    text_encodings: float


def step_work(config: TrainConfig, passes: int | None = None) -> StepWork:
    """The work of one optimizer step of ``config`` (ReFL: its expected stopping step), with ``passes`` denoiser
    passes per image and step (the family's :meth:`~finetune.families.base.Family.guidance_passes`; by default
    two unless the guidance scale is 1)."""
    batch = config.batch_size * config.grad_accum
    branches = passes or (1 if config.guidance_scale == 1.0 else 2)
    total = config.num_inference_steps
    texts = batch + (config.grad_accum if branches == 2 else 0)  # the empty prompt once per micro-batch
    if config.method == "draft-lv":
        images = batch * config.lv_n
        return StepWork(total * batch * branches, images * branches, images, images, texts)
    if config.method == "refl":
        low, high = refl_stop_range(total, config.refl_range)
        return StepWork((low + high) / 2 * batch * branches, batch * branches, batch, batch, texts)
    k = config.effective_k
    return StepWork((total - k) * batch * branches, k * batch * branches, batch, batch, texts)


def lower_bound_flops(work: StepWork, components: dict[str, int]) -> float:
    """Minimum FLOPs of a step: no-grad forwards once; graph-keeping forwards twice (forward + input-gradient
    backward); no recomputation, no weight gradients."""
    forward_only = work.denoiser_no_grad * components["denoiser"] + work.text_encodings * components["text encoder"]
    with_backward = (
        work.denoiser_grad * components["denoiser"]
        + work.decodes * components["decode"]
        + work.rewards * components["reward"]
    )
    return forward_only + 2 * with_backward


def step_floor_flops(trainer: Trainer) -> float:
    """The FLOP lower bound of one of ``trainer``'s optimizer steps, from its pipeline's and reward's component
    counts (counted under the trainer's autocast, as the step runs: on a GPU the frozen weights are bf16)."""
    config = trainer.config
    with trainer.autocast():
        components = component_flops(trainer.pipeline, trainer.reward, config.resolution)
    return lower_bound_flops(step_work(config, trainer.family.guidance_passes(config.guidance_scale)), components)


@dataclass
class StepProfile:
    """Measured seconds (median over repeats) and counted FLOPs of each phase of one training step."""

    seconds: dict[str, float]
    flops: dict[str, int]
    step_seconds: float
    peak_memory_bytes: int | None
    """``torch.cuda.max_memory_allocated`` during the timed steps (CUDA only)."""

    @property
    def counted_flops(self) -> int:
        return sum(self.flops.values())


def profile_step(trainer: Trainer, repeats: int = 3, warmup: int = 1, count: bool = True) -> StepProfile:
    """Time ``repeats`` training steps phase by phase (after ``warmup`` untimed ones, which also compile), then
    count one more step's FLOPs per phase under ``FlopCounterMode`` (slower, so untimed). Trains the LoRA."""
    return profile_steps({"": trainer}, repeats, warmup, count=("",) if count else ())[""]


def profile_steps(
    trainers: dict[str, Trainer], repeats: int = 3, warmup: int = 1, count: Sequence[str] = ()
) -> dict[str, StepProfile]:
    """Profile several trainers side by side: after ``warmup`` untimed steps each, ``repeats`` rounds in which
    every trainer takes one timed step in turn, so that a change in the machine's load during the measurement
    falls on all of them alike; medians per trainer. The trainers named in ``count`` then count one more step's
    FLOPs per phase (slower, so untimed). Trains the LoRAs."""
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.train_step()
    per_phase: dict[str, dict[str, list[float]]] = {name: {} for name in trainers}
    steps: dict[str, list[float]] = {name: [] for name in trainers}
    peaks: dict[str, int | None] = dict.fromkeys(trainers)
    for _ in range(repeats):
        for name, trainer in trainers.items():
            seconds, phases, peak = _timed_step(trainer)
            steps[name].append(seconds)
            for phase, value in phases.items():
                per_phase[name].setdefault(phase, []).append(value)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0, peak)
    return {
        name: StepProfile(
            {phase: statistics.median(values) for phase, values in per_phase[name].items()},
            _count_step_flops(trainer) if name in count else {},
            statistics.median(steps[name]),
            peaks[name],
        )
        for name, trainer in trainers.items()
    }


def _timed_step(trainer: Trainer) -> tuple[float, dict[str, float], int | None]:
    """One training step's seconds, seconds per phase, and CUDA peak memory."""
    timer = trainer.timer
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    timer.enabled = True
    timer.reset()
    try:
        start = time.perf_counter()
        trainer.train_step()
        timer.synchronize()
        seconds = time.perf_counter() - start
        phases = dict(timer.seconds)
    finally:
        timer.enabled = False
        timer.reset()
    peak = torch.cuda.max_memory_allocated(trainer.device) if trainer.device.type == "cuda" else None
    return seconds, phases, peak


def _count_step_flops(trainer: Trainer) -> dict[str, int]:
    """FLOPs per phase of one training step, counted op by op."""
    timer = trainer.timer
    timer.enabled = True
    timer.reset()
    try:
        with FlopCounterMode(display=False) as counter:
            timer.flop_counter = counter
            trainer.train_step()
        return dict(timer.flops)
    finally:
        timer.enabled = False
        timer.flop_counter = None
        timer.reset()


LORA_STATE_BYTES = 4 + 4 + 4 + 4
"""Per LoRA parameter: fp32 weight, fp32 gradient, and Adam's two fp32 moments."""


class _SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Bytes autograd saves for backward, each tensor (or the tensor a view is of) once, parameters excluded
    (they are counted as weights). Works on the meta device: tensors are told apart by identity, kept alive for
    the count so that no identity is reused."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: dict[int, torch.Tensor] = {}
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in self._seen and not isinstance(base, torch.nn.Parameter):
            self._seen[id(base)] = base
            self.bytes += base.numel() * base.element_size()
        return tensor


class _FusedAttention(TorchFunctionMode):
    """Attention as a GPU's fused kernels save it for backward (inputs, output and log-sum-exp; not the N x N
    probabilities that the meta device's math fallback would keep): unmasked, non-causal calls of
    ``scaled_dot_product_attention`` run as ``aten._scaled_dot_product_efficient_attention``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            call = {**dict(zip(names, args, strict=False)), **kwargs}
            plain = not any(call.get(name) for name in ("dropout_p", "is_causal", "enable_gqa"))
            if plain and call.get("attn_mask") is None:
                efficient = torch.ops.aten._scaled_dot_product_efficient_attention
                inputs = (call["query"], call["key"], call["value"])
                return efficient(*inputs, None, True, scale=call.get("scale"))[0]
        return func(*args, **kwargs)


def _bytes(modules: list[torch.nn.Module], trainable: bool = False) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad == trainable)


@dataclass(frozen=True)
class MemoryEstimate:
    """GPU memory of one DRaFT-1 step at batch 1 with gradient checkpointing, by part (bytes)."""

    frozen_weights: int
    """Every frozen network in bf16 (counted): denoiser, VAE, text encoders, reward."""
    text_encoders: int
    """The text encoders' share of ``frozen_weights`` (off the GPU with ``--offload-text-encoders``)."""
    lora_parameters: int
    """LoRA parameter count on the family's default targets (counted)."""
    lora_state: int
    """LoRA weights, gradients and Adam moments in fp32 (counted)."""
    denoiser_activations: int
    """Tensors one guided denoiser call saves for backward in bf16 (counted on the meta device): what the
    checkpointed grad step holds while it recomputes and back-propagates."""
    decode_reward_activations: int
    """Tensors the VAE decode and the reward save for backward in bf16 (counted on the meta device)."""

    @property
    def activations(self) -> int:
        """The two backward phases run one after the other, so the larger one is live at the peak."""
        return max(self.denoiser_activations, self.decode_reward_activations)

    @property
    def total(self) -> int:
        """Weights + LoRA state + the larger phase's activations. Not counted: the backward's transient
        buffers (gradients of activations, attention workspaces), the CUDA context and allocator slack."""
        return self.frozen_weights + self.lora_state + self.activations


def memory_model(
    pipeline: DiffusionPipeline, reward: torch.nn.Module, resolution: int | None = None, lora_rank: int = 8
) -> MemoryEstimate:
    """The memory of DRaFT-1 at batch 1 for a pipeline and reward built on the meta device (they are modified:
    cast to bf16, LoRA added as the trainer adds it), at the family's native resolution and guidance unless told.
    Weights and LoRA state are counted exactly; activations are the bytes autograd saves in one bf16 forward of
    each phase with LoRA trainable, which is the dominant part of a backward's working memory, not all of it."""
    from peft import LoraConfig

    family = family_for(pipeline)
    defaults = family.defaults
    resolution = resolution or defaults.resolution
    for module in [*family.components(), reward]:
        for parameter in module.requires_grad_(False).parameters():
            parameter.data = parameter.data.to(torch.bfloat16)
    family.denoiser.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(family.lora_targets)))
    for name, parameter in family.denoiser.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()  # the trainer keeps LoRA in fp32
    lora_parameters = sum(p.numel() for p in family.denoiser.parameters() if p.requires_grad)
    device = family.device
    solver = family.solver(1, resolution)
    noise = torch.zeros(1, *family.latent_shape(resolution), device=device, dtype=torch.bfloat16)
    latents = family.initial_latents(noise, solver)
    with torch.no_grad():
        conditioning = family.encode(["a photo"], defaults.guidance_scale, resolution)
    conditioning = conditioning._map(lambda value: value.to(torch.bfloat16) if value.is_floating_point() else value)
    denoiser_saved, decode_saved = _SavedActivations(), _SavedActivations()
    with denoiser_saved, _FusedAttention():
        family.guided(family.denoiser, latents, solver.timesteps[0], conditioning, defaults.guidance_scale)
    score = getattr(reward, "compute", reward)
    with decode_saved, _FusedAttention():
        images = family.decode(latents.detach().requires_grad_(), resolution)
        score(images.float().clamp(-1, 1) * 0.5 + 0.5, ["a photo"])
    text = family.text_encoders()
    return MemoryEstimate(
        frozen_weights=_bytes(family.components()) + _bytes([reward]),
        text_encoders=_bytes(text),
        lora_parameters=lora_parameters,
        lora_state=lora_parameters * LORA_STATE_BYTES,
        denoiser_activations=denoiser_saved.bytes,
        decode_reward_activations=decode_saved.bytes,
    )
