"""Command line: ``python -m compose mix|scale|inspect|fuse``.

python -m compose mix A.safetensors=0.7 B.safetensors=-0.3 -o mixed.safetensors [--rank R] [--format kohya]
python -m compose scale IN -o OUT --by 0.5
python -m compose inspect FILE
python -m compose fuse LORA --base PIPELINE_DIR -o FUSED_DIR [--by 0.8]

SD 1.x/2.x, SDXL, SD3/SD3.5 and FLUX.1; formats kohya, diffusers and (FLUX/SD3) original. The base model comes
from the modules' geometry; ``--base-model`` chooses where several fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from compose.geometry import BASE_MODELS

if TYPE_CHECKING:
    from compose.lora import LoRA


def parse_weighted(spec: str) -> tuple[Path, float]:
    """``PATH=WEIGHT`` (the last ``=`` separates; a bare path means weight 1)."""
    path, sep, weight = spec.rpartition("=")
    if not sep:
        return Path(spec), 1.0
    try:
        return Path(path), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad weight in {spec!r}; expected PATH=NUMBER") from None


def write(lora: LoRA, args: argparse.Namespace, inputs: list[Path], recipe: dict) -> None:
    from compose.formats import save_lora
    from compose.ops import svd_rerank

    output = Path(args.output)
    if not args.overwrite and any(output.resolve() == p.resolve() for p in inputs):
        raise ValueError(f"output {output} is one of the inputs; pass --overwrite to replace it")
    if output.exists() and not args.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    if args.rank:
        lora, report = svd_rerank(lora, args.rank)
        recipe["svd_rank"] = args.rank
        recipe["energy_kept"] = round(report.overall, 6)
        print(f"SVD to rank {args.rank}: {100 * report.overall:.2f}% of the energy kept overall", file=sys.stderr)
        worst = sorted(report.per_module.items(), key=lambda item: item[1])[:3]
        for name, kept in worst:
            print(f"  {100 * kept:6.2f}%  {name}", file=sys.stderr)
    path = save_lora(lora, output, args.format, args.dtype, recipe)
    print(f"wrote {path} ({args.format}, {args.dtype}, {len(lora.modules)} modules)")


def add_base_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model",
        choices=list(BASE_MODELS),
        default=None,
        help="the base model, where the LoRA's modules fit several (otherwise decided from their geometry)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compose", description="Exact LoRA arithmetic and export.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("mix", "scale"):
        sub = commands.add_parser(name)
        if name == "mix":
            sub.add_argument("inputs", nargs="+", type=parse_weighted, help="LoRA files as PATH=WEIGHT")
        else:
            sub.add_argument("input", type=Path)
            sub.add_argument("--by", type=float, required=True, help="0 = base model, 1 = the LoRA")
        sub.add_argument("-o", "--output", required=True)
        sub.add_argument("--format", choices=("kohya", "diffusers", "original"), default="kohya")
        sub.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
        sub.add_argument("--rank", type=int, default=None, help="re-factorise to this rank by SVD (lossy)")
        sub.add_argument("--overwrite", action="store_true", help="allow replacing an existing file")
        add_base_model(sub)
    fuse = commands.add_parser("fuse", help="fuse a LoRA into a full diffusers pipeline directory")
    fuse.add_argument("lora", type=Path)
    fuse.add_argument("--base", required=True, help="diffusers pipeline directory the LoRA was trained on")
    fuse.add_argument("--by", type=float, default=1.0, help="LoRA weight (0 = base model)")
    fuse.add_argument("-o", "--output", required=True, help="new directory for the fused pipeline")
    add_base_model(fuse)
    inspect = commands.add_parser("inspect")
    inspect.add_argument("file", type=Path)
    add_base_model(inspect)
    args = parser.parse_args(argv)
    # Imported after the arguments are parsed: --help and argument errors do not load torch.
    from compose.formats import detect, load_lora
    from compose.fuse import fuse_into_pipeline
    from compose.ops import mix

    try:
        if args.command == "inspect":
            lora = load_lora(args.file, args.base_model)
            family = BASE_MODELS[lora.base_model].family if lora.base_model else None
            info = {"format": detect(args.file), "family": family, **lora.summary(), "metadata": lora.metadata}
            print(json.dumps(info, indent=2, default=str))
        elif args.command == "fuse":
            path = fuse_into_pipeline(mix([load_lora(args.lora, args.base_model)], [args.by]), args.base, args.output)
            print(f"wrote {path}")
        elif args.command == "mix":
            paths = [p for p, _ in args.inputs]
            weights = [w for _, w in args.inputs]
            recipe = {"method": "concat", "inputs": [str(p) for p in paths], "weights": weights}
            write(mix([load_lora(p, args.base_model) for p in paths], weights), args, paths, recipe)
        else:
            recipe = {"method": "scale", "inputs": [str(args.input)], "weights": [args.by]}
            write(mix([load_lora(args.input, args.base_model)], [args.by]), args, [args.input], recipe)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
