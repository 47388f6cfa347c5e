"""Command line: ``python -m finetune train --model PATH --reward aesthetic --method draft-k ...`` and
``python -m finetune demo [--output-dir DIR]`` (the embedded shapes world, CPU, no download).

Settings come from the dataclass defaults, then ``--config FILE`` (YAML), then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from finetune.config import ATTENTION, COMPILE_MODES, METHOD_NAMES, MIXED_PRECISION, TrainConfig

FLAGS: dict[str, dict[str, Any]] = {
    "model": dict(help="hub id or local diffusers directory of an SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1 pipeline"),
    "reward": dict(help="reward name or weighted mix, e.g. 'aesthetic' or 'aesthetic=1,brightness=0.5'"),
    "reward_normalize": dict(action=argparse.BooleanOptionalAction, help="standardise mix members by their scale"),
    "method": dict(choices=METHOD_NAMES),
    "k": dict(type=int, help="DRaFT-K: number of final sampling steps that keep the graph"),
    "lv_n": dict(type=int, help="DRaFT-LV: number of re-noised copies of the final sample"),
    "steps": dict(type=int, help="optimizer steps"),
    "batch_size": dict(type=int),
    "grad_accum": dict(type=int, help="micro-batches per optimizer step"),
    "resolution": dict(type=int, help="image side in pixels (default: the model family's)"),
    "num_inference_steps": dict(type=int, help="sampling steps T (default: the model family's)"),
    "guidance_scale": dict(type=float, help="default: the model family's (FLUX.1-dev: its guidance embedding)"),
    "lora_rank": dict(type=int),
    "lora_alpha": dict(type=float),
    "lora_targets": dict(nargs="+", help="denoiser modules to adapt (default: the model family's attention)"),
    "train_text_encoder": dict(action=argparse.BooleanOptionalAction),
    "offload_text_encoders": dict(action=argparse.BooleanOptionalAction, help="text encoders on the CPU between uses"),
    "lr": dict(type=float),
    "weight_decay": dict(type=float),
    "max_grad_norm": dict(type=float),
    "seed": dict(type=int),
    "prompts": dict(help="built-in prompt set (animals, varied) or a text file with one prompt per line"),
    "eval_prompts": dict(help="built-in set or file of held-out prompts for the image grids"),
    "mixed_precision": dict(choices=MIXED_PRECISION, help="default: bf16 on CUDA, no on CPU"),
    "gradient_checkpointing": dict(action=argparse.BooleanOptionalAction),
    "checkpoint_decode": dict(action=argparse.BooleanOptionalAction, help="checkpoint the VAE decode too"),
    "checkpoint_reward": dict(action=argparse.BooleanOptionalAction, help="checkpoint the reward model too"),
    "grad_chunk_size": dict(type=int, help="images per chunk in the gradient part (peak memory follows it)"),
    "compile_prefix": dict(action=argparse.BooleanOptionalAction, help="torch.compile the no-grad sampling UNet"),
    "compile_mode": dict(choices=COMPILE_MODES),
    "channels_last": dict(action=argparse.BooleanOptionalAction, help="channels-last UNet and VAE"),
    "attention": dict(choices=ATTENTION),
    "allow_tf32": dict(action=argparse.BooleanOptionalAction, help="TF32 matmuls on CUDA (default on)"),
    "output_dir": dict(),
    "eval_every": dict(type=int),
    "checkpoint_every": dict(type=int),
    "resume": dict(action="store_true", default=None, help="continue from the last checkpoint in --output-dir"),
    "device": dict(help="default: cuda if available, else cpu"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description="Fine-tune diffusion models on rewards.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune LoRA adapters on a reward")
    train.add_argument("--config", help="YAML file of settings; flags given here override it")
    for name, options in FLAGS.items():
        train.add_argument("--" + name.replace("_", "-"), dest=name, **{"default": None, **options})
    demo = commands.add_parser("demo", help="run DRaFT, LoRA export and mixing in the embedded world (no download)")
    demo.add_argument("--output-dir", default="outputs/demo", help="where the grids, LoRAs and report go")
    demo.add_argument("--steps", type=int, help="training steps per LoRA (default: the demo's setting)")
    return parser


def demo(args: argparse.Namespace) -> None:
    from finetune.demo import DemoConfig, run_demo

    config = DemoConfig(output_dir=args.output_dir, **({"steps": args.steps} if args.steps else {}))
    summary = run_demo(config)
    print(f"done in {summary['seconds']:.0f} s: see {Path(config.output_dir) / 'report.md'}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the YAML file, then the flags that were given."""
    values = TrainConfig.load(args.config).to_dict() if args.config else {}
    values.update({name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None})
    values["extra"] = {**values.get("extra", {}), "command": " ".join(sys.argv)}
    return TrainConfig.from_dict(values)


def train(config: TrainConfig) -> None:
    from finetune.checkpoint import require_checkpoint
    from finetune.pipelines import load_pipeline
    from finetune.trainer import Trainer
    from rewards import combine

    if not config.model:
        raise ValueError("--model is required (a hub id or a local diffusers directory)")
    if config.resume:  # fail before loading anything large
        require_checkpoint(Path(config.output_dir) / "checkpoints")
    pipeline = load_pipeline(config.model)
    reward = combine(config.reward, normalize=config.reward_normalize)
    history = Trainer(pipeline, reward, config).train()
    if history:
        print(f"done: step {history[-1]['step']}, reward {history[-1]['reward']:.4g}; LoRA in {config.output_dir}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            demo(args)
        else:
            train(config_from_args(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
