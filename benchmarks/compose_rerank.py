"""Time ``compose scale --rank 16`` against plain ``compose mix`` on random LoRAs of real geometries.

For each base model (SD 1.5, SDXL, FLUX.1-dev; shapes from the real configurations on the meta device), two
random rank-32 LoRAs on the usual targets are written in the diffusers format; then, in this process, through the
CLI entry point: ``mix A=0.7 B=0.5`` (rank 64 out, exact), ``scale MIXED --by 1 --rank 16`` (the SVD re-rank of
that mix) and ``mix A=0.7 B=0.5 --rank 16``. Each time includes reading and writing the files, as a user sees it.

    python benchmarks/compose_rerank.py                  # sd_v1, sdxl_base_v1-0, flux-1-dev
    python benchmarks/compose_rerank.py --bases sd_v1 --rank 32 --target-rank 16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import tempfile
import time
from pathlib import Path

import provenance
import torch

from compose import LoRA, LoRAModule, save_lora
from compose.__main__ import main as compose
from compose.geometry import module_shapes

TARGETS = {
    "sd_v1": r"(attn[12]\.(to_[qkv]|to_out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2)|self_attn\.\w+_proj|mlp\.fc[12])$",
    "sdxl_base_v1-0": r"^unet\..*(attn[12]\.(to_[qkv]|to_out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2))$",
    "flux-1-dev": r"^transformer\.(single_)?transformer_blocks\.\d+\.(attn\.\w+|ff\w*\.net\.(0\.proj|2)|proj_\w+)",
}
"""kohya's default targets for SD (UNet transformers and CLIP, or the UNet alone for SDXL), and every attention and
MLP Linear of the FLUX blocks (a common FLUX LoRA)."""


def random_lora(base: str, rank: int, seed: int) -> LoRA:
    generator = torch.Generator().manual_seed(seed)
    pattern = re.compile(TARGETS[base])
    modules = {}
    for name, shape in module_shapes(base).items():
        if pattern.search(name):
            up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
            down = torch.randn(rank, *shape[1:], generator=generator) / shape[1] ** 0.5
            modules[name] = LoRAModule(down, torch.randn(up_shape, generator=generator) * 1e-2, float(rank))
    return LoRA(modules, base_model=base)


def timed(argv: list[str], repeats: int) -> float:
    """Best of ``repeats`` runs of ``python -m compose ARGV`` (overwriting its output): the machine may be shared."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = compose([*argv, "--overwrite"])
        if code != 0:
            raise RuntimeError(f"compose {' '.join(argv)} failed: {err.getvalue()}")
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", nargs="+", default=["sd_v1", "sdxl_base_v1-0", "flux-1-dev"])
    parser.add_argument("--rank", type=int, default=32, help="rank of each input LoRA")
    parser.add_argument("--target-rank", type=int, default=16)
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"), help="of every file")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs of each command")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(provenance.header())
    print(f"{torch.get_num_threads()} torch threads")
    print(
        f"inputs: 2 random rank-{args.rank} LoRAs ({args.dtype}); re-rank to {args.target_rank}; best of {args.repeats}"
    )
    print("| base model | modules | params/LoRA | mix (s) | scale --rank (s) | ratio | mix --rank (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for base in args.bases:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            paths = []
            for seed in (0, 1):
                lora = random_lora(base, args.rank, seed)
                paths.append(save_lora(lora, root / f"in{seed}.safetensors", "diffusers", args.dtype))
            params = sum(m.down.numel() + m.up.numel() for m in lora.modules.values())
            del lora
            common = ["--format", "diffusers", "--dtype", args.dtype]
            inputs = [f"{paths[0]}=0.7", f"{paths[1]}=0.5"]
            mixed = root / "mixed.safetensors"
            t_mix = timed(["mix", *inputs, "-o", str(mixed), *common], args.repeats)
            rank = ["--rank", str(args.target_rank)]
            t_scale = timed(
                ["scale", str(mixed), "--by", "1", "-o", str(root / "scaled.safetensors"), *rank, *common], args.repeats
            )
            t_mix_rank = timed(["mix", *inputs, "-o", str(root / "mixed16.safetensors"), *rank, *common], args.repeats)
            print(
                f"| {base} | {count_modules(base)} | {params / 1e6:.1f} M | {t_mix:.2f} | {t_scale:.2f} | "
                f"{t_scale / t_mix:.2f} | {t_mix_rank:.2f} | {t_mix_rank / t_mix:.2f} |",
                flush=True,
            )
    print(provenance.footer())


def count_modules(base: str) -> int:
    pattern = re.compile(TARGETS[base])
    return sum(1 for name in module_shapes(base) if pattern.search(name))


if __name__ == "__main__":
    main()
