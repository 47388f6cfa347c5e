"""Model families: each supported pipeline class, behind the protocol of :mod:`finetune.families.base`.

Adding a family is one module with a :class:`~finetune.families.base.Family` subclass, listed in ``FAMILIES``.
"""

from __future__ import annotations

from diffusers import DiffusionPipeline

from finetune.families.base import Conditioning, Family, FamilyDefaults, Solver
from finetune.families.flux import Flux
from finetune.families.sd import StableDiffusion
from finetune.families.sd3 import StableDiffusion3
from finetune.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, type[Family]] = {
    cls.name: cls for cls in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)
}
"""Every supported family by name (the one place a family is registered)."""


def supported() -> str:
    """The supported pipeline classes and the models they cover, for error messages."""
    return ", ".join(f"{cls.pipeline_class.__name__} ({cls.title})" for cls in FAMILIES.values())


def family_class(pipeline_class_name: str) -> type[Family]:
    """The family of a pipeline class name (``model_index.json``'s ``_class_name``)."""
    for cls in FAMILIES.values():
        if cls.pipeline_class.__name__ == pipeline_class_name:
            return cls
    raise ValueError(f"{pipeline_class_name} is not a supported pipeline; supported: {supported()}")


def family_for(pipeline: DiffusionPipeline) -> Family:
    """The family of a pipeline object (checked: unsupported variants raise ``ValueError``)."""
    for cls in FAMILIES.values():
        if cls.matches(pipeline):
            return cls(pipeline)
    raise ValueError(
        f"expected a diffusers {', '.join(cls.pipeline_class.__name__ for cls in FAMILIES.values())}; got "
        f"{type(pipeline).__name__}. Supported: {supported()}. PixArt, Sana, Kandinsky, video and inpainting "
        f"pipelines are not supported."
    )


__all__ = ["FAMILIES", "Conditioning", "Family", "FamilyDefaults", "Solver", "family_class", "family_for", "supported"]
