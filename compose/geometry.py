"""The real base models a LoRA can target, their module geometry (built on the ``meta`` device: no weights), and
the inference of a LoRA's base model from the modules it covers and their weight shapes.

A base model is named by its id here (``sd_v1``, ``sdxl_base_v1-0``, ``sd3.5-large``, ``flux-1-dev``...); each
carries the values kohya-ss/sd-scripts writes for it (``ss_base_model_version``, ``modelspec.architecture``,
``modelspec.implementation``), which AUTOMATIC1111, Forge and ComfyUI read to list and label LoRA files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a geometry is built, so the CLI's --help stays light
    import torch

    from compose.lora import LoRA

STABILITY = "https://github.com/Stability-AI/generative-models"
BFL = "https://github.com/black-forest-labs/flux"


@dataclass(frozen=True)
class BaseModel:
    name: str
    family: str
    """``sd`` (1.x/2.x), ``sdxl``, ``sd3`` or ``flux``: models of one family share key grammars."""
    kohya_version: str
    architecture: str
    implementation: str


BASE_MODELS = {
    m.name: m
    for m in (
        BaseModel("sd_v1", "sd", "sd_v1", "stable-diffusion-v1/lora", "diffusers"),
        BaseModel("sd_v2", "sd", "sd_v2", "stable-diffusion-v2-512/lora", "diffusers"),
        BaseModel("sdxl_base_v1-0", "sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", STABILITY),
        BaseModel("sd3-medium", "sd3", "medium", "stable-diffusion-3-medium/lora", "diffusers"),
        BaseModel("sd3.5-medium", "sd3", "5-medium", "stable-diffusion-3-5-medium/lora", "diffusers"),
        BaseModel("sd3.5-large", "sd3", "5-large", "stable-diffusion-3-5-large/lora", "diffusers"),
        BaseModel("flux-1-dev", "flux", "flux1", "flux-1-dev/lora", BFL),
        BaseModel("flux-1-schnell", "flux", "flux1", "flux-1-schnell/lora", BFL),
    )
}
INFERRED = ("sd_v1", "sd_v2", "sdxl_base_v1-0", "sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-1-dev")
"""The geometries a LoRA is matched against (FLUX.1-schnell is FLUX.1-dev without the guidance embedder: only
metadata or ``--base-model`` tells them apart)."""

UNET_CONFIGS = {
    "sd_v1": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
    ),
    "sd_v2": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    ),
    "sdxl_base_v1-0": dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
"""The real SD 1.5, SD 2.x and SDXL base UNet configurations."""
_SD3 = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64, joint_attention_dim=4096,
    pooled_projection_dim=2048,
)  # fmt: skip
TRANSFORMER_CONFIGS = {
    "sd3-medium": dict(
        _SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192
    ),
    "sd3.5-medium": dict(
        _SD3,
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    "sd3.5-large": dict(
        _SD3,
        num_layers=38,
        num_attention_heads=38,
        caption_projection_dim=2432,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
    ),
    "flux-1-dev": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
    ),
}
"""The real SD3-medium, SD3.5-medium, SD3.5-large and FLUX.1-dev transformer configurations (diffusers names)."""
TEXT_ENCODERS = {"clip-l": (768, 3072, 12), "openclip-h": (1024, 4096, 23), "openclip-bigg": (1280, 5120, 32)}
"""CLIP text encoders as (width, MLP width, layers): CLIP-L, OpenCLIP ViT-H (SD 2.x), OpenCLIP ViT-bigG."""
COMPONENT_ENCODERS = {
    "sd_v1": {"text_encoder": "clip-l"},
    "sd_v2": {"text_encoder": "openclip-h"},
    "sdxl_base_v1-0": {"text_encoder": "clip-l", "text_encoder_2": "openclip-bigg"},
    "sd3-medium": {"text_encoder": "clip-l", "text_encoder_2": "openclip-bigg"},
    "sd3.5-medium": {"text_encoder": "clip-l", "text_encoder_2": "openclip-bigg"},
    "sd3.5-large": {"text_encoder": "clip-l", "text_encoder_2": "openclip-bigg"},
    "flux-1-dev": {"text_encoder": "clip-l"},
}
"""The CLIP text encoders LoRAs train, per base model (T5 encoders are not covered)."""
TEXT_ENCODER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
TEXT_ENCODER_TARGETS += ("mlp.fc1", "mlp.fc2")


def text_encoder_shapes(component: str, encoder: str) -> dict[str, tuple[int, ...]]:
    """Weight shapes of the Linear layers LoRAs target in a CLIP text encoder (the transformers naming rule)."""
    width, mlp, layers = TEXT_ENCODERS[encoder]
    leaf_shapes = {leaf: (width, width) for leaf in TEXT_ENCODER_TARGETS[:4]}
    leaf_shapes.update({"mlp.fc1": (mlp, width), "mlp.fc2": (width, mlp)})
    return {
        f"{component}.text_model.encoder.layers.{i}.{leaf}": shape
        for i in range(layers)
        for leaf, shape in leaf_shapes.items()
    }


def _linear_shapes(model: torch.nn.Module, component: str) -> dict[str, tuple[int, ...]]:
    import torch

    layers = (torch.nn.Linear, torch.nn.Conv2d)
    return {f"{component}.{n}": tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, layers)}


@functools.cache
def denoiser_shapes(base: str) -> dict[str, tuple[int, ...]]:
    """``unet.<name>`` or ``transformer.<name>`` -> weight shape, for every Linear/Conv2d of the real denoiser."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        if base in UNET_CONFIGS:
            return _linear_shapes(UNet2DConditionModel(**UNET_CONFIGS[base]), "unet")
        model_class = FluxTransformer2DModel if base.startswith("flux") else SD3Transformer2DModel
        return _linear_shapes(model_class(**TRANSFORMER_CONFIGS[base]), "transformer")


@functools.cache
def module_shapes(base: str) -> dict[str, tuple[int, ...]]:
    """Every module a LoRA can target in base model ``base`` (its geometry: schnell's is dev's), with its shape."""
    base = "flux-1-dev" if base == "flux-1-schnell" else base
    shapes = dict(denoiser_shapes(base))
    for component, encoder in COMPONENT_ENCODERS[base].items():
        shapes.update(text_encoder_shapes(component, encoder))
    return shapes


def fitting_base_models(modules: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The known base models that have every one of ``modules`` (name -> weight shape) with that shape."""
    components = {name.split(".", 1)[0] for name in modules}
    fits = []
    for base in INFERRED:
        is_unet = base in UNET_CONFIGS
        if ("unet" in components and not is_unet) or ("transformer" in components and is_unet):
            continue
        known = {}
        for component, encoder in COMPONENT_ENCODERS[base].items():
            known.update(text_encoder_shapes(component, encoder))
        if components & {"unet", "transformer"}:
            known.update(denoiser_shapes(base))
        if all(known.get(name) == shape for name, shape in modules.items()):
            fits.append(base)
    if "flux-1-dev" in fits:
        fits.append("flux-1-schnell")
    return tuple(fits)


def metadata_hint(metadata: dict[str, str]) -> str | None:
    """The base model a file's kohya / model-spec header names, if any."""
    architecture = metadata.get("modelspec.architecture", "").split("/")[0]
    version = metadata.get("ss_base_model_version", "")
    for model in BASE_MODELS.values():
        if architecture and model.architecture.split("/")[0] == architecture:
            return model.name
    for model in BASE_MODELS.values():
        if version and version.startswith(model.kohya_version):  # sd_v2_v is sd_v2
            return model.name
    return None


def resolve_base_model(lora: LoRA, explicit: str | None = None) -> LoRA:
    """Set ``lora.base_model`` from the geometry of its modules (whatever subset they are); the file's metadata only
    breaks ties, ``explicit`` (``--base-model``) decides among fitting ones. Records how in ``base_model_reason``."""
    shapes = {name: module.weight_shape for name, module in lora.modules.items()}
    fits = fitting_base_models(shapes) if shapes else ()
    hint = metadata_hint(lora.metadata)
    count = f"{len(shapes)} module{'s' * (len(shapes) != 1)}"
    lora.candidates = fits
    if explicit is not None:
        if explicit not in BASE_MODELS:
            raise ValueError(f"unknown base model {explicit!r}; choose one of {', '.join(BASE_MODELS)}")
        if fits and explicit not in fits:
            raise ValueError(
                f"{lora.source or 'the LoRA'}: its {count} do not fit {explicit}'s geometry (it fits {', '.join(fits)})"
            )
        fitting = f"geometry fits {', '.join(fits)}" if fits else "a custom geometry, of no known size"
        lora.base_model, lora.base_model_reason = explicit, f"--base-model ({fitting})"
    elif len(fits) == 1 or (fits and set(fits) <= {"flux-1-dev", "flux-1-schnell"} and hint not in fits):
        lora.base_model = fits[0]
        lora.base_model_reason = f"geometry: of the known base models only {fits[0]} has these {count} and shapes"
        if len(fits) > 1:
            lora.base_model_reason = f"geometry fits FLUX.1 ({count}; dev and schnell share it): taken as flux-1-dev"
        if hint and hint != lora.base_model:
            lora.base_model_reason += f"; the file's metadata said {hint}, which does not fit"
    elif fits and hint in fits:
        lora.base_model = hint
        lora.base_model_reason = f"geometry fits {', '.join(fits)} ({count}); the file's metadata names {hint}"
    elif fits:
        lora.base_model = None
        lora.base_model_reason = f"ambiguous: geometry fits {', '.join(fits)} ({count}); pass --base-model"
    else:
        lora.base_model = None
        lora.base_model_reason = f"no known base model has these {count} with these shapes (a custom geometry)"
    return lora
