"""The model-family protocol: what the sampler and the methods need from a text-to-image pipeline, and the two
solvers (DDIM and flow-matching Euler) the families share.

A family wraps one diffusers pipeline class. It encodes prompts into the denoiser's conditioning, gives the latent
shape of a resolution, builds the sampling schedule from the pipeline's own scheduler configuration, makes one
guided denoiser call, and decodes latents to images. The solver makes one step from a schedule position, gives the
predicted clean latents of that step, and re-noises clean latents to a position's noise level. Everything is
computed as the family's diffusers pipeline computes it, so that with no LoRA the project's sampler reproduces the
pipeline's own output (``tests/finetune/test_families.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler


@dataclass
class Conditioning:
    """The denoiser's text conditioning of a batch.

    ``cond`` holds the prompt rows ([B, ...] tensors by denoiser argument name), ``uncond`` the same for the
    guidance branch (the empty prompt) or ``None`` without classifier-free guidance, and ``shared`` the inputs
    common to every row (e.g. FLUX's position ids).
    """

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def repeat(self, n: int) -> Conditioning:
        """Each row repeated ``n`` times (row-major: a, a, b, b for n = 2)."""
        return self._map(lambda value: value.repeat_interleave(n, dim=0))

    def rows(self, index: slice) -> Conditioning:
        """The conditioning of the batch rows ``index``."""
        return self._map(lambda value: value[index])

    def _map(self, function: Any) -> Conditioning:
        cond = {key: function(value) for key, value in self.cond.items()}
        uncond = None if self.uncond is None else {key: function(value) for key, value in self.uncond.items()}
        return Conditioning(cond, uncond, self.shared)


@dataclass(frozen=True)
class FamilyDefaults:
    """The sampling settings of a family's published usage."""

    resolution: int
    num_inference_steps: int
    guidance_scale: float


class Solver(ABC):
    """One sampling schedule of a diffusers scheduler: the denoiser's timesteps, one step, x0 and re-noising."""

    scheduler: Any

    @property
    def timesteps(self) -> torch.Tensor:
        """The denoiser's timestep at each schedule position (positions 0 .. T-1, noisiest first)."""
        return self.scheduler.timesteps

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The sampler's starting latents from standard normal noise (as the pipelines' ``prepare_latents``)."""
        return noise * self.scheduler.init_noise_sigma

    @abstractmethod
    def step(
        self, output: torch.Tensor, index: int, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from schedule position ``index`` given the guided model output: ``(next latents, x0)``."""

    @abstractmethod
    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """Clean latents ``x0`` noised to the level of schedule position ``index`` with ``noise``."""


class DDIMSolver(Solver):
    """DDIM (``eta`` 0: deterministic) through ``DDIMScheduler.step``; epsilon and v-prediction alike."""

    def __init__(self, scheduler: DDIMScheduler, num_inference_steps: int, eta: float = 0.0) -> None:
        self.scheduler = scheduler
        self.eta = eta
        scheduler.set_timesteps(num_inference_steps)

    def step(
        self, output: torch.Tensor, index: int, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.scheduler.step(output, self.timesteps[index], latents, eta=self.eta, generator=generator)
        return result.prev_sample, result.pred_original_sample

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, self.timesteps[index].reshape(1))


class FlowMatchSolver(Solver):
    """Rectified-flow Euler over ``FlowMatchEulerDiscreteScheduler``'s sigmas (shift and dynamic ``mu`` applied by
    the scheduler's ``set_timesteps``, as the pipelines call it). With velocity ``v`` at noise level ``sigma``:
    ``x <- x + (sigma_next - sigma) * v`` (in float32, as the scheduler's ``step``), ``x0 = x - sigma * v``, and
    re-noising is ``(1 - sigma) * x0 + sigma * noise`` (the scheduler's ``scale_noise``)."""

    UNSUPPORTED = ("stochastic_sampling", "invert_sigmas")

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        num_inference_steps: int,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        eta: float = 0.0,
    ) -> None:
        if eta != 0.0:
            raise ValueError(f"eta {eta}: flow-matching sampling is deterministic Euler; set eta to 0")
        for option in self.UNSUPPORTED:
            if scheduler.config.get(option):
                raise ValueError(f"the scheduler's {option} option is not supported; set it to False in its config")
        self.scheduler = scheduler
        scheduler.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise  # flow matching starts from pure noise at sigma 1 (the pipelines do not scale it)

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise level of each schedule position, then the final 0."""
        return self.scheduler.sigmas

    def step(
        self, output: torch.Tensor, index: int, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        prev = (latents.float() + (sigma_next - sigma) * output).to(output.dtype)
        return prev, latents - sigma * output

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        sigma = self.sigmas[index].to(x0.device, x0.dtype)
        return sigma * noise + (1.0 - sigma) * x0


class Family(ABC):
    """A text-to-image model family: one diffusers pipeline class and how to sample it.

    Subclasses set the class attributes and implement the abstract methods; register the class in
    ``finetune/families/__init__.py``.
    """

    name: ClassVar[str]
    """Short name (``--family`` in the benchmarks, the README table)."""
    title: ClassVar[str]
    """The models it covers, for messages."""
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    denoiser_name: ClassVar[str]
    """The pipeline attribute of the network LoRA trains: ``unet`` or ``transformer``."""
    lora_targets: ClassVar[tuple[str, ...]]
    """Default LoRA target modules of the denoiser (peft ``target_modules``)."""
    defaults: ClassVar[FamilyDefaults]
    load_kwargs: ClassVar[dict[str, Any]] = {}
    """Extra ``from_pretrained`` arguments (e.g. no safety checker)."""

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        self.pipeline = pipeline
        self.check()

    @classmethod
    def matches(cls, pipeline: object) -> bool:
        return isinstance(pipeline, cls.pipeline_class)

    @abstractmethod
    def check(self) -> None:
        """Raise ``ValueError`` if the pipeline is a variant of the class this family cannot sample."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be a multiple of this."""
        return self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, height, width) of the VAE latents of a square image."""
        side = resolution // self.vae_scale_factor
        return (self.pipeline.vae.config.latent_channels, side, side)

    @abstractmethod
    def solver(self, num_inference_steps: int, resolution: int, eta: float = 0.0) -> Solver:
        """A solver over a fresh scheduler built from the pipeline's scheduler configuration."""

    def initial_latents(self, noise: torch.Tensor, solver: Solver) -> torch.Tensor:
        """The sampler's state at position 0 from noise of :meth:`latent_shape` (packed for FLUX)."""
        return solver.initial_latents(noise)

    def guidance_passes(self, guidance_scale: float) -> int:
        """Denoiser passes per image and step: two with classifier-free guidance (as the pipelines decide it: a
        scale above 1), else one."""
        return 2 if guidance_scale > 1.0 else 1

    @abstractmethod
    def encode(self, prompts: Sequence[str], guidance_scale: float, resolution: int) -> Conditioning:
        """Text conditioning of ``prompts``, with the empty prompt's when the family guides with two passes."""

    @abstractmethod
    def predict(
        self,
        denoiser: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """One denoiser call on a batch of latents with the rows' conditioning ``inputs``."""

    def guided(
        self,
        denoiser: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The guided model output: two-pass classifier-free guidance (empty prompt first, as the pipelines) when
        the conditioning has an unconditional branch, else one pass."""
        if conditioning.uncond is None:
            return self.predict(denoiser, latents, timestep, conditioning.cond, conditioning.shared, guidance_scale)
        inputs = {key: torch.cat([conditioning.uncond[key], value]) for key, value in conditioning.cond.items()}
        both = self.predict(
            denoiser, torch.cat([latents, latents]), timestep, inputs, conditioning.shared, guidance_scale
        )
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @abstractmethod
    def decode(self, latents: torch.Tensor, resolution: int) -> torch.Tensor:
        """VAE-decode the sampler's latents to images in the VAE's range [-1, 1]."""

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (``text_encoder``, ``text_encoder_2``, ...)."""
        components = self.pipeline.components
        return [module for name, module in components.items() if name.startswith("text_encoder") and module is not None]

    def components(self) -> list[torch.nn.Module]:
        """Every network of the pipeline (all frozen before LoRA is added)."""
        return [module for module in self.pipeline.components.values() if isinstance(module, torch.nn.Module)]
