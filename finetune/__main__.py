"""Command line: ``python -m finetune train --model PATH --reward aesthetic --method draft-k ...`` and
``python -m finetune demo [--output-dir DIR]`` (the embedded shapes world, CPU, no download).

Settings come from the dataclass defaults, then the model's preset (``--model world``), then ``--config FILE``
(YAML), then the flags given on the command line. Arguments are checked before anything large is imported or
loaded; ``--help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

from finetune.config import (
    ATTENTION,
    COMPILE_MODES,
    DRAFT_METHOD_NAMES,
    METHOD_NAMES,
    MIXED_PRECISION,
    RL_METHOD_NAMES,
    TrainConfig,
)
from rewards import hints
from rewards.cli import parse_options, parse_weights

WORLD_MODEL = "world"
"""``--model world``: the embedded shapes-world pipeline shipped with the package, with its own defaults."""

FLAGS: dict[str, dict[str, Any]] = {
    "model": dict(
        help="hub id or local diffusers directory of an SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1 pipeline, or "
        f"'{WORLD_MODEL}' for the embedded shapes world (required)"
    ),
    "reward": dict(help="reward name or weighted mix, e.g. 'aesthetic' or 'aesthetic=1,brightness=0.5'"),
    "reward_normalize": dict(action=argparse.BooleanOptionalAction, help="standardise mix members by their scale"),
    "method": dict(choices=METHOD_NAMES),
    "k": dict(type=int, help="DRaFT-K: number of final sampling steps that keep the graph"),
    "lv_n": dict(type=int, help="DRaFT-LV: number of re-noised copies of the final sample"),
    "ddpo_inner_epochs": dict(type=int, help="ddpo/grpo: PPO passes over each round's trajectories"),
    "ddpo_minibatches": dict(type=int, help="ddpo/grpo: optimizer steps per pass (minibatches of the round)"),
    "ddpo_clip_range": dict(type=float, help="ddpo/grpo: PPO clip range of the importance ratio"),
    "ddpo_adv_clip": dict(type=float, help="ddpo/grpo: advantages are clipped to +-this"),
    "ddpo_timestep_fraction": dict(type=float, help="ddpo/grpo: fraction of sampling steps trained per minibatch"),
    "ddpo_eta": dict(type=float, help="ddpo: DDIM eta of the sampled trajectories"),
    "ddpo_buffer_size": dict(type=int, help="ddpo: rewards kept per prompt for per-prompt normalisation"),
    "ddpo_min_count": dict(type=int, help="ddpo: below this many kept rewards a prompt uses the round's statistics"),
    "grpo_group_size": dict(type=int, help="grpo: samples per prompt (advantages relative to the group)"),
    "grpo_noise_level": dict(type=float, help="grpo: a of the SDE noise a*sqrt(t/(1-t))"),
    "grpo_kl_weight": dict(type=float, help="grpo: weight of the per-step KL to the base model (LoRA off)"),
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
    "allow_tf32": dict(action=argparse.BooleanOptionalAction, help="TF32 matmuls on CUDA"),
    "output_dir": dict(),
    "eval_every": dict(type=int),
    "checkpoint_every": dict(type=int),
    "resume": dict(action="store_true", default=None, help="continue from the last checkpoint in --output-dir"),
    "overwrite": dict(action="store_true", default=None, help="replace an earlier run's outputs in --output-dir"),
    "device": dict(help="default: cuda if available, else cpu"),
    "eval_seeds": dict(type=int, nargs="+", metavar="SEED", help="held-out evaluation noise seeds (2+: diversity)"),
    "eval_rewards": dict(
        nargs="+",
        metavar="REWARD",
        help="judges scored at every evaluation, never trained on: reward names or mixes, or 'none' (default: the "
        "zoo's preference rewards whose weights are available; in the world, prompt agreement)",
    ),
    "diversity_warn": dict(type=float, help="warn when held-out diversity falls below this fraction of the base's"),
    "early_stop": dict(
        metavar="judge=NAME,patience=N,drop=X",
        help="stop when NAME (a judge, 'reward' or 'diversity') has been more than X below its best for N "
        "evaluations; the final LoRA is the best one",
    ),
    "anchor_weight": dict(type=float, help="penalty on the distance from the base model's predictions (0: off)"),
}


EPILOG = f"""\
examples:
  python -m finetune train --model {WORLD_MODEL} --reward brightness --steps 60 --output-dir runs/world
      (the embedded world: CPU, no download, about a minute; its preset sets resolution 32, 10 steps, guidance 3)
  python -m finetune train --model runwayml/stable-diffusion-v1-5 --reward aesthetic --method draft-lv \\
      --steps 2000 --output-dir runs/aesthetic
  python -m finetune train --model {WORLD_MODEL} --reward jpeg-compressibility --method ddpo --steps 40 \\
      --output-dir runs/ddpo  (the RL methods, ddpo and grpo, take any reward, also one without a gradient)

Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and prints the --resume command."""


def default_text(name: str) -> str:
    """The dataclass default of setting ``name`` as the help shows it."""
    value = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]
    if value is None or value is dataclasses.MISSING:
        return ""
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return f" (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description="Fine-tune diffusion models on rewards.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="fine-tune LoRA adapters on a reward",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML file of settings; flags given here override it")
    for name, options in FLAGS.items():
        options = {"default": None, **options}
        if options.get("action") != "store_true":
            options["help"] = options.get("help", "") + default_text(name)
        train.add_argument("--" + name.replace("_", "-"), dest=name, **options)
    reward = train.add_argument_group("reward arguments (as `python -m rewards` takes them)")
    reward.add_argument(
        "--option",
        dest="reward_options",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the reward (repeatable), e.g. --reward shapes --option objective=size",
    )
    reward.add_argument(
        "--weights",
        dest="reward_weights",
        action="append",
        metavar="PATH | COMPONENT=PATH[,...]",
        help="the reward's local weights: one PATH, or COMPONENT=PATH for each part (e.g. clip=DIR,head=FILE)",
    )
    reward.add_argument(
        "--random-weights",
        dest="reward_random_weights",
        action="store_true",
        default=None,
        help="build the reward with random weights (no download; for tests)",
    )
    demo = commands.add_parser(
        "demo", help="run DRaFT, LoRA export, mixing and reward hacking vs early stopping in the embedded world"
    )
    demo.add_argument("--output-dir", default="outputs/demo", help="where the grids, LoRAs and report go")
    demo.add_argument(
        "--steps", type=int, help="training steps per LoRA (default 60; the over-optimisation runs take 2/5 of it)"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs in --output-dir")
    return parser


def demo(args: argparse.Namespace) -> None:
    from finetune.outputs import check_output_dir

    check_output_dir(Path(args.output_dir), resume=False, overwrite=args.overwrite, what="demo")
    from finetune.demo import DemoConfig, run_demo

    settings = {"steps": args.steps} if args.steps else {}
    config = DemoConfig(output_dir=args.output_dir, overwrite=args.overwrite, **settings)
    summary = run_demo(config)
    print(f"done in {summary['seconds']:.0f} s: see {Path(config.output_dir) / 'report.md'}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the model's preset, then the YAML file, then the flags that were given."""
    values = TrainConfig.read_settings(args.config) if args.config else {}
    values.update({name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None})
    if args.reward_options:
        values["reward_options"] = parse_options(args.reward_options)
    if args.reward_weights:
        values["reward_weights"] = parse_weights(args.reward_weights)
    if args.reward_random_weights:
        values["reward_random_weights"] = True
    if values.get("model") == WORLD_MODEL:
        from finetune.world import SHIPPED_PIPELINE, WORLD_DDPO_TRAINING, WORLD_TRAINING

        preset = {**WORLD_TRAINING, **(WORLD_DDPO_TRAINING if values.get("method") == "ddpo" else {})}
        values = {**preset, **values, "model": str(SHIPPED_PIPELINE)}
    values["extra"] = {**values.get("extra", {}), "command": " ".join(sys.argv)}
    return TrainConfig.from_dict(values)


def check_model_argument(model: str | None) -> None:
    """Fail fast on a missing ``--model`` or a local path that is not a diffusers pipeline directory (hub ids are
    checked when loading)."""
    if not model:
        raise ValueError(f"--model is required: a hub id, a local diffusers directory or '{WORLD_MODEL}'")
    path = Path(model).expanduser()
    path_like = path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
    if path.exists() or path_like:
        if not path.is_dir():
            raise FileNotFoundError(f"--model {model}: no such directory (a local diffusers pipeline directory)")
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"--model {model}: the directory holds no model_index.json, so it is not a diffusers pipeline "
                f"(save one with pipeline.save_pretrained(DIR) or download one with `hf download REPO --local-dir DIR`)"
            )


def not_differentiable_message(name: str) -> str:
    """Why a reward with no gradient cannot drive the DRaFT-family methods, and what to do instead."""
    return (
        f"reward '{name}' is not differentiable (its score carries no gradient to the images), so the DRaFT-family "
        f"methods ({', '.join(DRAFT_METHOD_NAMES)}) cannot train on it: use an RL method, --method ddpo (SD 1.x/2.x, "
        f"SDXL) or --method grpo (SD3, FLUX), or choose a differentiable reward (`python -m rewards list` marks them)"
    )


def check_arguments(config: TrainConfig) -> None:
    """Everything that can be checked before a model is loaded, cheapest first: the model path, prompt sets, the
    output directory (and, for --resume, its checkpoint), then the reward (whose registry imports the zoo)."""
    from finetune.outputs import check_output_dir
    from finetune.prompts import load_prompts

    check_model_argument(config.model)
    for spec in (config.prompts, config.eval_prompts):
        load_prompts(spec)
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.resume, config.overwrite)
    if config.resume:
        from finetune.checkpoint import require_checkpoint

        require_checkpoint(output_dir / "checkpoints")
    check_reward_arguments(config)
    if config.eval_rewards:
        from finetune.guards import NO_JUDGES, EarlyStopSpec, check_eval_rewards

        judges = [] if tuple(config.eval_rewards) == NO_JUDGES else list(config.eval_rewards)
        check_eval_rewards(judges)
        if config.early_stop:
            EarlyStopSpec.parse(config.early_stop).check_available(judges)


def check_reward_arguments(config: TrainConfig) -> None:
    """Known reward names, differentiable unless the method is an RL one; options only for a single reward, and
    only those its builder takes."""
    from rewards.combine import parse_reward_spec
    from rewards.registry import get_entry

    members = parse_reward_spec(config.reward)
    for name in members:
        if config.method not in RL_METHOD_NAMES and not get_entry(name).differentiable:
            raise ValueError(not_differentiable_message(name))
    if config.reward_options or config.reward_weights is not None:
        if len(members) > 1:
            raise ValueError("--weights and --option apply to a single reward; build mixes with options in Python")
        entry = get_entry(next(iter(members)))
        unknown = sorted(set(config.reward_options) - set(entry.options))
        if unknown:
            takes = ", ".join(entry.options) or "none"
            raise ValueError(f"reward '{entry.name}' has no option {', '.join(unknown)} (its options: {takes})")


def build_cli_judges(config: TrainConfig) -> dict[str, Any]:
    """The run's judges: those given (an unavailable one is an error), or the defaults (an unavailable one is
    skipped with a warning)."""
    from finetune.guards import build_judges, default_eval_rewards
    from finetune.world import SHIPPED_PIPELINE

    pretrained = not config.reward_random_weights
    if config.eval_rewards is not None:
        return build_judges(config.eval_rewards, pretrained)
    world = Path(config.model or "").resolve() == SHIPPED_PIPELINE.resolve()
    return build_judges(default_eval_rewards(config.reward, world), pretrained, skip_unavailable=True)


def train(config: TrainConfig) -> None:
    check_arguments(config)
    from finetune import distributed
    from finetune.guards import NO_JUDGES
    from finetune.pipelines import load_pipeline
    from finetune.trainer import Trainer
    from rewards.cli import build_reward_from_spec

    reward = build_reward_from_spec(  # before the pipeline: a reward error is cheaper to find than a model load
        config.reward,
        config.reward_options,
        config.reward_weights,
        pretrained=not config.reward_random_weights,
        normalize=config.reward_normalize,
    )
    judges = build_cli_judges(config)
    config = config.replace(eval_rewards=tuple(judges) or NO_JUDGES)  # training_config.yaml names those used
    pipeline = load_pipeline(config.model)
    history = Trainer(pipeline, reward, config, judges=judges).train()
    distributed.teardown()
    if history:
        print(f"done: step {history[-1]['step']}, reward {history[-1]['reward']:.4g}; LoRA in {config.output_dir}")


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same arguments, with --resume, without --overwrite."""
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    return shlex.join(["python", "-m", "finetune", *kept, "--resume"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except KeyboardInterrupt:  # a second Ctrl-C, wherever it lands; every file written is atomic
        print("\nstopped at once (second interrupt); the last complete checkpoint, if any, is intact", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed command; errors a user can fix and interruptions become messages and exit statuses."""
    from finetune.interrupt import TrainingInterrupted

    try:
        with hints.command_line():  # hints in reward errors name the command line's flags
            if args.command == "demo":
                demo(args)
            else:
                train(config_from_args(args))
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"{stop}.", file=sys.stderr)
        if stop.checkpoint is not None:
            print(f"resume with: {resume_command(argv)}", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
