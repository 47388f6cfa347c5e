"""kohya-ss / AUTOMATIC1111 LoRA files, which AUTOMATIC1111, Forge, ComfyUI, InvokeAI and diffusers all read.

Key grammar: ``<prefix>_<module name with every "." replaced by "_">`` + ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank).

* SD 1.x/2.x: prefixes ``lora_unet`` (diffusers UNet module names) and ``lora_te``.
* SDXL: ``lora_unet`` with Stability (SGM) UNet names (``input_blocks_4_1_...``), ``lora_te1`` and ``lora_te2``.
* FLUX.1 / SD3: ``lora_unet`` with the original checkpoint names (``double_blocks_0_img_attn_qkv``,
  ``single_blocks_0_linear1``, ``joint_blocks_0_x_block_attn_qkv``; fused projections, see ``original.py``), as
  sd-scripts writes them and ComfyUI, Forge and diffusers read them; ``lora_te1`` (CLIP-L), ``lora_te2`` (CLIP-G).
  Writing SGM names, never a mix of both schemes, is what every UI loads (diffusers drops SGM keys mixed with
  diffusers names; InvokeAI refuses the mix).

Reading maps names back through the real module names of SD 1.5 or SDXL (built on the ``meta`` device), so an
unknown name is an error instead of a silently ignored key.
"""

from __future__ import annotations

import datetime
import functools
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from compose.files import atomic_write
from compose.formats import checked_module, clean_metadata, export_dtype, read_safetensors, refuse_unsupported
from compose.formats.original import family_of_names, fuse, name_table, original_module, write_tensors
from compose.geometry import BASE_MODELS, TEXT_ENCODER_TARGETS, TEXT_ENCODERS, UNET_CONFIGS
from compose.lora import TRAINED_ON, LoRA, LoRAModule

PREFIXES = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "sd3": {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "flux": {"transformer": "lora_unet", "text_encoder": "lora_te1"},
}
TEXT_ENCODER_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
GEOMETRY = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}
"""The geometry whose module names a family's kohya names are read against (SD 2.x has SD 1.5's names)."""


@functools.cache
def _sgm_prefixes() -> tuple[tuple[str, str, bool], ...]:
    """(diffusers prefix, SGM prefix, is a ResNet) pairs for the SDXL UNet (kohya's sdxl_model_util map)."""
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("add_embedding.linear_1.", "label_emb.0.0.", False),
        ("add_embedding.linear_2.", "label_emb.0.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.attentions.0.", "middle_block.1.", False),
    ]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True) for j in range(2)]
    for i in range(3):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0.", True))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.", False))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0.", True))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1.", False))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op.", False))
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.2.", False))
    return tuple(pairs)


SGM_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)


def sgm_name(path: str) -> str:
    """SDXL UNet module name, diffusers -> Stability (SGM): ``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``."""
    dotted = path + "."
    for hf, sgm, resnet in _sgm_prefixes():
        if dotted.startswith(hf):
            rest = dotted[len(hf) :]
            if resnet:
                rest = next((new + rest[len(old) :] for old, new in SGM_RESNET if rest.startswith(old)), rest)
            return (sgm + rest).rstrip(".")
    raise ValueError(f"SDXL UNet module {path!r} has no Stability-style name")


def family(lora: LoRA) -> str:
    """``sd`` (SD 1.x/2.x), ``sdxl``, ``sd3`` or ``flux``, from the base model or else (a custom geometry) the
    module names."""
    if lora.base_model:
        return BASE_MODELS[lora.base_model].family
    if lora.candidates:
        raise ValueError(
            f"the base model is ambiguous: the LoRA's modules fit {', '.join(lora.candidates)}, and a kohya file "
            f"names its base model for the UIs; pass --base-model"
        )
    names = list(lora.modules)
    if any(n.startswith("transformer.") for n in names):
        return transformer_family(lora)
    sdxl_only = re.compile(r"^(text_encoder_2\.|unet\.(add_embedding|.*transformer_blocks\.[1-9]))")
    return "sdxl" if any(sdxl_only.match(n) for n in names) else "sd"


def transformer_family(lora: LoRA) -> str:
    """``flux`` or ``sd3`` for a LoRA on a transformer: its base model, or names only one of them has."""
    if lora.base_model and BASE_MODELS[lora.base_model].family in ("flux", "sd3"):
        return BASE_MODELS[lora.base_model].family
    flux_only = re.compile(r"^transformer\.(single_transformer_blocks|x_embedder|time_text_embed\.guidance)")
    sd3_only = re.compile(r"^transformer\.(pos_embed|.*\.attn2\.)")
    if any(flux_only.match(n) for n in lora.modules):
        return "flux"
    if any(sd3_only.match(n) for n in lora.modules):
        return "sd3"
    raise ValueError(
        "cannot tell whether this transformer LoRA is for FLUX.1 or SD3 (its modules fit no known geometry and "
        "exist in both); pass --base-model"
    )


def header_for(lora: LoRA, path: Path, kind: str, today: datetime.date) -> dict[str, str]:
    """kohya-ss / model-spec header: what AUTOMATIC1111, Forge and ComfyUI read to list and label the file.

    A LoRA of a custom geometry (no known base model has its modules) claims no base model; the model it was
    trained on, when its metadata names it (:data:`~compose.lora.TRAINED_ON`), is carried either way."""
    ranks = sorted({m.rank for m in lora.modules.values()})
    dim = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    header = {
        "ss_network_module": {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}.get(kind, "networks.lora"),
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_output_name": path.stem,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": path.stem,
        "modelspec.date": today.isoformat(),
    }
    if lora.base_model:
        base = BASE_MODELS[lora.base_model]
        header.update(
            {
                "ss_base_model_version": base.kohya_version,
                "ss_v2": str(base.name == "sd_v2"),
                "modelspec.architecture": base.architecture,
                "modelspec.implementation": base.implementation,
            }
        )
    if lora.metadata.get(TRAINED_ON):
        header[TRAINED_ON] = lora.metadata[TRAINED_ON]
    return header


def kohya_name(module: str, kind: str) -> str:
    """``unet.down_blocks.0...to_q`` -> ``lora_unet_down_blocks_0_..._to_q`` (SDXL UNet: SGM names)."""
    if kind in ("flux", "sd3") and not module.startswith("text_encoder"):
        return f"lora_unet_{module.replace('.', '_')}"  # an original (BFL / Stability) name, from fuse()
    component, path = module.split(".", 1)
    if component not in PREFIXES[kind]:
        raise ValueError(f"module {module}: a {kind.upper()} LoRA has no {component}; is the base model right?")
    if component == "unet" and kind == "sdxl":
        path = sgm_name(path)
    elif component != "unet" and not TEXT_ENCODER_LAYER.fullmatch(path):
        raise ValueError(
            f"module {module}: {path} is not a text-encoder layer that UIs load (only encoder layers' "
            f"{', '.join(TEXT_ENCODER_TARGETS)}); drop it before exporting"
        )
    return f"{PREFIXES[kind][component]}_{path.replace('.', '_')}"


@functools.cache
def known_modules(kind: str) -> dict[str, str]:
    """kohya name -> module name for every Linear/Conv2d a LoRA can target (UNet module names from the real UNet
    on the meta device; CLIP text-encoder layers by the transformers naming rule)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[GEOMETRY[kind]])
    names = [f"unet.{n}" for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for component in PREFIXES[kind]:
        if component != "unet":
            for layer in range(max(layers for _, _, layers in TEXT_ENCODERS.values())):
                names += [f"{component}.text_model.encoder.layers.{layer}.{leaf}" for leaf in TEXT_ENCODER_TARGETS]
    return {kohya_name(n, kind): n for n in names}


UNET_NAME_PARTS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "attentions", "resnets", "downsamplers",
    "upsamplers", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "ff", "net", "proj",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv",
)  # fmt: skip
"""Segments of diffusers UNet module names that LoRAs target (``_`` inside a segment is not a separator)."""
_UNET_PARTS = "|".join(sorted(UNET_NAME_PARTS, key=len, reverse=True))  # longest first: conv_shortcut before conv
_UNET_NAME = re.compile(rf"(?:{_UNET_PARTS}|\d+)(?:_|$)")


def diffusers_unet_name(stem: str) -> str | None:
    """``lora_unet_up_blocks_0_attentions_0_..._to_k`` -> ``unet.up_blocks.0.attentions.0...to_k`` for a UNet of any
    diffusers geometry (the SD 1.5 table covers SD itself); ``None`` unless every segment is a known one."""
    if not stem.startswith("lora_unet_"):
        return None
    rest, parts = stem.removeprefix("lora_unet_"), []
    while rest:
        match = _UNET_NAME.match(rest)
        if match is None:
            return None
        parts.append(match.group(0).removesuffix("_"))
        rest = rest[match.end() :]
    return "unet." + ".".join(parts)


def read(path: Path) -> LoRA:
    tensors, header = read_safetensors(path)
    header = clean_metadata(header, path)
    refuse_unsupported(tensors, path)
    stems: dict[str, dict] = {}
    for key, tensor in tensors.items():
        stem, _, leaf = key.partition(".")
        if leaf not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(f"{path}: unexpected key {key!r} (expected .lora_down.weight, .lora_up.weight, .alpha)")
        stems.setdefault(stem, {})[leaf] = tensor
    transformer = family_of_names(s.removeprefix("lora_unet_") for s in stems if s.startswith("lora_unet_"))
    if transformer:
        return read_transformer(path, stems, transformer, header)
    sgm = re.compile(r"^lora_(te[12]_|unet_(input_blocks|middle_block|output_blocks|label_emb)_)")
    kind = "sdxl" if header.get("ss_base_model_version", "").startswith("sdxl") or any(map(sgm.match, stems)) else "sd"
    known = known_modules(kind)
    modules = {}
    for stem, parts in stems.items():
        name = known.get(stem) or (diffusers_unet_name(stem) if kind == "sd" else None)
        if name is None:
            label = "SDXL" if kind == "sdxl" else "SD 1.x/2.x"
            raise ValueError(
                f"{path}: {stem!r} is not an {label} module name (nor a diffusers UNet name) under the kohya grammar"
            )
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{path}: module {stem} lacks its lora_down or lora_up weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else float(down.shape[0])
        modules[name] = checked_module(path, stem, down, up, alpha)
    return LoRA(modules, metadata=header)


@functools.cache
def transformer_names(kind: str) -> dict[str, str]:
    """kohya name -> original module name (transformer) or module name (text encoders) for FLUX.1 / SD3."""
    names = {f"lora_unet_{original.replace('.', '_')}": original for original in name_table(kind)}
    width = max(layers for _, _, layers in TEXT_ENCODERS.values())
    for component, prefix in PREFIXES[kind].items():
        if component != "transformer":
            for layer in range(width):
                for leaf in TEXT_ENCODER_TARGETS:
                    path = f"text_model.encoder.layers.{layer}.{leaf}"
                    names[f"{prefix}_{path.replace('.', '_')}"] = f"{component}.{path}"
    return names


def read_transformer(path: Path, stems: dict[str, dict], kind: str, header: dict[str, str]) -> LoRA:
    """A FLUX.1 / SD3 kohya file: original names (fused layers split exactly) and CLIP text encoders."""
    names = transformer_names(kind)
    modules: dict[str, LoRAModule] = {}
    for stem, parts in stems.items():
        name = names.get(stem)
        if name is None:
            raise ValueError(f"{path}: {stem!r} is not a {kind.upper()} module name under the kohya grammar")
        if name.startswith("text_encoder"):
            if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                raise ValueError(f"{path}: module {stem} lacks its lora_down or lora_up weight")
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else float(down.shape[0])
            modules[name] = checked_module(path, stem, down, up, alpha)
        else:
            modules.update(original_module(path, name, parts, kind, label=stem))
    return LoRA(modules, metadata=header)


def complete_attention(modules: dict[str, LoRAModule]) -> dict[str, LoRAModule]:
    """Add zero rank-1 LoRAs for the missing projections of partially covered text-encoder attention layers.

    SD 2.x's and SDXL's second text encoder run as ``nn.MultiheadAttention`` in AUTOMATIC1111, which applies a
    LoRA there only when q, k, v and out are all present; otherwise it fails the whole layer.
    """
    completed = dict(modules)
    for name, module in modules.items():
        stem, _, leaf = name.rpartition(".")
        if not name.startswith("text_encoder") or leaf not in ("q_proj", "k_proj", "v_proj", "out_proj"):
            continue
        width = module.down.shape[1]  # the projections of one layer are width x width
        for other in ("q_proj", "k_proj", "v_proj", "out_proj"):
            completed.setdefault(f"{stem}.{other}", LoRAModule(torch.zeros(1, width), torch.zeros(width, 1), 1.0))
    return completed


def write(lora: LoRA, path: Path, dtype: str = "fp32", recipe: str | None = None) -> None:
    kind = family(lora)
    # FLUX / SD3: the transformer under original names (fused projections). SD: A1111's attention completed.
    modules = fuse(lora.modules, kind) if kind in ("flux", "sd3") else complete_attention(lora.modules)
    tensors = write_tensors(modules, lambda name: kohya_name(name, kind), export_dtype(dtype))
    header = header_for(lora, path, kind, datetime.date.today())
    if recipe:
        header["draft.merge_recipe"] = recipe
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
