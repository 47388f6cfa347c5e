"""Load compose's FLUX.1 and SD3.5 LoRA exports with ComfyUI's own loader: every key consumed, the exact delta applied.

For each base model (FLUX.1-dev; SD3.5-medium and SD3.5-large), two random LoRAs on a subset of blocks in the real
geometry (every module kind of those blocks: fused q/k/v, the FLUX single blocks' linear1 = q, k, v and the MLP
input, the modulations, SD3.5-medium's second attention, the last joint block's context-only layers and its swapped
(shift, scale) norm, the final layer, the embedders, and CLIP text-encoder layers) are mixed with compose
(``0.7 * A - 0.4 * B``; the last block's fused layers are covered only in part) and written as kohya, original
(``diffusion_model.``) and diffusers files. Then ComfyUI, imported from ``--comfyui``:

* builds its own model for that geometry: diffusers' model on the ``meta`` device (no weights) gives the state
  dict's names and shapes, ComfyUI's ``convert_diffusers_mmdit`` and ``model_config_from_unet`` turn them into its
  checkpoint layout and detect the model (the path ``load_diffusion_model_state_dict`` takes for a diffusers file),
  and ``get_model`` builds it on ``meta``; the text encoders are its ``CLIP`` built from its own ``ClipTarget``;
* reads each file with ``comfy.utils.load_torch_file`` and ``comfy.sd.load_lora_for_models`` (what the LoraLoader
  node calls: its key maps, ``load_lora``, ``add_patches``); the keys it logs as not loaded are reported;
* for every patched weight, puts a zero float32 base weight in place and runs ``ModelPatcher.
  patch_weight_to_device`` (its ``calculate_weight``, with the offsets and swap functions of its key maps); the
  applied delta is compared with the intended ``0.7 * delta_A - 0.4 * delta_B``, placed into the checkpoint's
  weights through ComfyUI's diffusers-name key map (the table it also loads diffusers model files with), not
  through compose's own tables.

    python benchmarks/comfyui_lora_check.py --comfyui /path/to/ComfyUI [--family flux|sd3|both]

ComfyUI is GPL and is not a dependency: it is imported from the given checkout at run time (it needs ``einops``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import provenance
import torch

from compose import LoRA, LoRAModule, mix, save_lora
from compose.geometry import TRANSFORMER_CONFIGS, module_shapes

FORMATS = ("kohya", "original", "diffusers")
WEIGHTS = (0.7, -0.4)
BASES = {"flux": ("flux-1-dev",), "sd3": ("sd3.5-medium", "sd3.5-large")}
BLOCKS = {
    "flux-1-dev": r"transformer_blocks\.(0|18)\.|single_transformer_blocks\.(0|37)\.",
    "sd3.5-medium": r"transformer_blocks\.(0|12|23)\.",
    "sd3.5-large": r"transformer_blocks\.(0|37)\.",
}
"""The blocks covered: the first and the last (SD3.5-medium: also its last block with a second attention)."""
TEXT_LAYERS = (
    r"text_encoder\.text_model\.encoder\.layers\.(0|11)\.|text_encoder_2\.text_model\.encoder\.layers\.(0|31)\."
)
LAST = {"flux-1-dev": (18, 37), "sd3.5-medium": (23, None), "sd3.5-large": (37, None)}
"""Last double/joint block and last single block, whose fused layers the mix covers only in part."""
PART = re.compile(r"\.(to_|add_)(q|k|v)(_proj)?$|\.proj_mlp$")


def partial(base: str, name: str) -> str | None:
    """For a fused layer's part in the last blocks: ``q``/``v``/``k``/``mlp`` (A gets q and mlp, B gets v, nobody
    gets k: the fused layer is written with zero rows); ``None`` for every other module (in both A and B)."""
    double, single = LAST[base]
    in_last = f"transformer.transformer_blocks.{double}." in name or (
        single is not None and f"transformer.single_transformer_blocks.{single}." in name
    )
    match = PART.search(name)
    if not in_last or match is None:
        return None
    return "mlp" if name.endswith("proj_mlp") else match[2]


def input_loras(base: str) -> tuple[LoRA, LoRA]:
    """Two random LoRAs (rank 4, alpha 6 and rank 8, alpha 4) on the chosen blocks, embedders, final layer and
    text-encoder layers of ``base``'s real geometry."""
    chosen = re.compile(rf"^transformer\.({BLOCKS[base]})|^transformer\.(?!(single_)?transformer_blocks)|{TEXT_LAYERS}")
    shapes = {name: shape for name, shape in module_shapes(base).items() if chosen.search(name)}
    loras = []
    for seed, (rank, alpha, parts) in enumerate(((4, 6.0, ("q", "mlp", None)), (8, 4.0, ("v", None)))):
        generator = torch.Generator().manual_seed(seed)
        modules = {}
        for name, shape in shapes.items():
            if partial(base, name) not in parts:
                continue
            down = torch.randn(rank, *shape[1:], generator=generator) / math.prod(shape[1:]) ** 0.5
            up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
            modules[name] = LoRAModule(down, torch.randn(up_shape, generator=generator) * 0.02, alpha)
        loras.append(LoRA(modules, base_model=base))
    return loras[0], loras[1]


class Captured(logging.Handler):
    """ComfyUI reports through the root logger: keys not loaded, patches not applied, shape mismatches."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        taken, self.messages = self.messages, []
        return taken


COMFYUI_MODULES = ("lora", "model_detection", "model_patcher", "sd", "supported_models_base", "utils")
COMFYUI_MODULES += ("text_encoders.flux", "text_encoders.sd3_clip")


def import_comfyui(path: Path):
    """ComfyUI's ``comfy`` package from the user's checkout (not an installed dependency, hence ``importlib``), on
    the CPU (its device probe would ask for CUDA otherwise), and its text-encoder targets per family."""
    if not (path / "comfy" / "lora.py").exists():
        raise SystemExit(f"--comfyui {path}: not a ComfyUI checkout (no comfy/lora.py there)")
    sys.path.append(str(path))
    try:
        importlib.import_module("comfy.cli_args").args.cpu = True
        for name in COMFYUI_MODULES:
            importlib.import_module(f"comfy.{name}")
    except ModuleNotFoundError as err:
        raise SystemExit(
            f"ComfyUI at {path} needs {err.name!r}: pip install {err.name} (not a compose dependency)"
        ) from None
    comfy = sys.modules["comfy"]
    encoders = comfy.text_encoders
    clip_targets = {
        "flux": comfy.supported_models_base.ClipTarget(encoders.flux.FluxTokenizer, encoders.flux.FluxClipModel),
        "sd3": comfy.supported_models_base.ClipTarget(encoders.sd3_clip.SD3Tokenizer, encoders.sd3_clip.SD3ClipModel),
    }
    return comfy, clip_targets


def comfyui_models(comfy, clip_target, base: str):
    """ComfyUI's model patcher for ``base`` and its CLIP, both on the ``meta`` device (names and shapes only)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    meta = torch.device("meta")
    model_class = FluxTransformer2DModel if base.startswith("flux") else SD3Transformer2DModel
    with meta:
        state_dict = dict(model_class(**TRANSFORMER_CONFIGS[base]).state_dict())
        converted = comfy.model_detection.convert_diffusers_mmdit(state_dict, "")
        config = comfy.model_detection.model_config_from_unet(converted, "")
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model(converted, "", device=meta)
        clip = comfy.sd.CLIP(clip_target, model_options={"initial_device": meta, "dtype": torch.float32})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), clip, config


def placement(key_map: dict, name: str) -> tuple[str, tuple | None, object]:
    """Where ComfyUI's key map puts a diffusers module: (weight key, (dim, start, length) or None, function)."""
    target = key_map[name]
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], target[2] if len(target) > 2 else None


def applied_delta(owner, key: str, shape: tuple[int, ...], comfy) -> torch.Tensor:
    """What ComfyUI's ``patch_weight_to_device`` adds at ``key``, on a zero base weight (its ``calculate_weight``
    adds ``strength * alpha / rank * up @ down``, so the patched weight is the delta; a random base would only add
    its float32 rounding). The weight is back on ``meta`` afterwards: FLUX's are up to 18432 x 3072, one at a time."""
    comfy.utils.set_attr_param(owner.model, key, torch.zeros(shape))
    owner.patch_weight_to_device(key)
    applied = comfy.utils.get_attr(owner.model, key).detach()
    owner.backup.pop(key, None)
    comfy.utils.set_attr_param(owner.model, key, torch.empty(shape, device="meta"))
    return applied


def intended_delta(shape: tuple[int, ...], parts: list, inputs: tuple[LoRA, LoRA]) -> torch.Tensor:
    """``sum_i WEIGHTS[i] * scale_i * up_i @ down_i`` of the inputs (not the mix), for each diffusers module that
    ComfyUI's key map places in this weight: at its rows, through its function (final norms: (shift, scale) swap)."""
    expected = torch.zeros(shape)
    for name, offset, function in parts:
        part = expected if offset is None else expected.narrow(*offset)
        target = torch.zeros(part.shape) if function else part
        for weight, lora in zip(WEIGHTS, inputs, strict=True):
            if name in lora.modules:
                module = lora.modules[name]
                product = module.up.flatten(1), module.down.flatten(1)
                target.view(target.shape[0], -1).addmm_(*product, alpha=weight * module.scale)
        if function:
            part += function(target)
    return expected


def largest(tensor: torch.Tensor) -> float:
    """``tensor.abs().max()`` without a temporary of its size (FLUX's weights are up to 226 MB)."""
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))


def check_base(comfy, clip_target, base: str, log: Captured, root: Path) -> tuple[list[dict], list[list[str]]]:
    """One summary per format and one row per checkpoint weight, for one base model."""
    started = time.perf_counter()
    a, b = input_loras(base)
    mixed = mix([a, b], WEIGHTS)
    patcher, clip, config = comfyui_models(comfy, clip_target, base)
    log.take()
    summaries, loaded, in_file = {}, {}, {}
    for fmt in FORMATS:
        lora = mixed
        if fmt == "original":  # the checkpoint layout holds the denoiser only
            lora = LoRA({n: m for n, m in mixed.modules.items() if n.startswith("transformer.")}, base_model=base)
        in_file[fmt] = set(lora.modules)
        tensors = comfy.utils.load_torch_file(str(save_lora(lora, root / f"{base}_{fmt}.safetensors", fmt)), True)
        model_lora, clip_lora = comfy.sd.load_lora_for_models(patcher, clip, tensors, 1.0, 1.0)
        messages = log.take()
        not_loaded = [m.split(": ", 1)[1] for m in messages if m.startswith("lora key not loaded")]
        loaded[fmt] = {k: model_lora for k in model_lora.patches} | {
            k: clip_lora.patcher for k in clip_lora.patcher.patches
        }
        summaries[fmt] = {
            "base": base, "model": type(config).__name__, "format": fmt, "keys": len(tensors),
            "not_loaded": not_loaded, "weights": len(loaded[fmt]),
            "patches": sum(len(owner.patches[k]) for k, owner in loaded[fmt].items()),
            "messages": [m for m in messages if not m.startswith("lora key not loaded")], "error": 0.0,
        }  # fmt: skip

    # The intended delta of each checkpoint weight, placed through ComfyUI's diffusers-name key map.
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    intended: dict[str, list] = {}
    for name in mixed.modules:
        key, offset, function = placement(key_map, name)
        intended.setdefault(key, []).append((name, offset, function))

    shapes = {**patcher.model.state_dict(), **clip.cond_stage_model.state_dict()}
    rows = []
    for key in sorted(set(intended).union(*loaded.values())):
        shape = tuple(shapes[key].shape)
        expected = intended_delta(shape, intended.get(key, []), (a, b))
        scale = largest(expected)
        counts, errors = [], []
        for fmt in FORMATS:
            wanted = any(name in in_file[fmt] for name, _, _ in intended.get(key, []))
            owner = loaded[fmt].get(key)
            if owner is None:
                counts.append("0")
                errors.append("NOT PATCHED" if wanted else "-")
                summaries[fmt]["error"] = max(summaries[fmt]["error"], 1.0 if wanted else 0.0)
                continue
            applied = applied_delta(owner, key, shape, comfy)
            summaries[fmt]["messages"] += log.take()
            error = largest(applied.sub_(expected)) / scale if wanted else float("inf")
            summaries[fmt]["error"] = max(summaries[fmt]["error"], error)
            counts.append(str(len(owner.patches[key])))
            errors.append(f"{error:.1e}" if wanted else "NOT INTENDED")
        rows.append([key, "x".join(map(str, shape)), " / ".join(counts), " / ".join(errors)])
    for summary in summaries.values():
        summary["seconds"] = time.perf_counter() - started
    return list(summaries.values()), rows


def comfyui_revision(path: Path) -> str:
    """The checkout's commit (or, for an exported tree, that it is none) and its ``comfyui_version.py``."""
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    version = re.search(r'__version__ = "([^"]+)"', (path / "comfyui_version.py").read_text(errors="replace"))
    return f"commit {head or 'unknown (not a git checkout)'}, version {version[1] if version else 'unknown'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout (its comfy/ package is imported from there)")
    parser.add_argument("--family", default="both", choices=("flux", "sd3", "both"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if args.comfyui is None:
        print("skipped: pass --comfyui DIR, a ComfyUI checkout (ComfyUI is not a dependency of this project)")
        return 0
    comfy, clip_targets = import_comfyui(args.comfyui)
    torch.set_num_threads(args.threads)
    log = Captured()
    logging.getLogger().addHandler(log)
    logging.getLogger().setLevel(logging.WARNING)
    print(provenance.header())
    print(f"ComfyUI: {args.comfyui}, {comfyui_revision(args.comfyui)}")
    print(f"mix: {WEIGHTS[0]} * A (rank 4, alpha 6) {WEIGHTS[1]:+} * B (rank 8, alpha 4), fp32 files")
    families = ("flux", "sd3") if args.family == "both" else (args.family,)
    details, failed = {}, False
    print()
    print("| base model | ComfyUI model | format | file keys | loaded | not loaded | weights patched | patches | "
          "max rel. error | time (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            for base in BASES[family]:
                summaries, details[base] = check_base(comfy, clip_targets[family], base, log, Path(tmp))
                for s in summaries:
                    failed |= bool(s["not_loaded"] or s["messages"]) or s["error"] > 1e-5
                    print(
                        f"| {s['base']} | {s['model']} | {s['format']} | {s['keys']} | "
                        f"{s['keys'] - len(s['not_loaded'])} | {len(s['not_loaded'])} | {s['weights']} | "
                        f"{s['patches']} | {s['error']:.1e} | {s['seconds']:.0f} |",
                        flush=True,
                    )
                    for key in s["not_loaded"]:
                        print(f"| | | | | | not loaded: `{key}` | | | | |")
                    for message in s["messages"]:
                        print(f"| | | | | | ComfyUI logged: `{message}` | | | | |")
    for base, rows in details.items():
        print()
        print(f"{base}: every weight ComfyUI patched or the mix targets; patches and max relative error per format")
        print(f"({' / '.join(FORMATS)}; '-': not in that file)")
        print()
        print("| weight | shape | patches | max rel. error |")
        print("|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    print()
    print(provenance.footer())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
