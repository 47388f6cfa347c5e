"""DDPO raises a non-differentiable reward in the embedded world: the JPEG compressibility of its samples, measured
on held-out prompts and noise seeds against the shipped pipeline.

    python benchmarks/ddpo_jpeg.py [--seeds 3] [--steps 60] [--jobs 2] [--output benchmarks/results]
    python benchmarks/ddpo_jpeg.py --smoke --output DIR   # seconds: the code path, no figures worth reading

Each training seed fine-tunes one LoRA with ``finetune``'s trainer (``--method ddpo`` on ``--reward``, the world's
24 training prompts; the settings are the flags below, by default the world's DDPO preset
``finetune.world.WORLD_DDPO_TRAINING``, and are recorded in the report). Then the shipped pipeline, and
each LoRA loaded by diffusers' own ``load_lora_weights`` (as a user loads the file), sample the world's 12
held-out prompts at ``--eval-seeds`` noise seeds from 2000 (training draws its noise from its own seeded
generator, and its periodic evaluation uses seeds 1000-1003), deterministic DDIM at the world's 10 steps. Reported
per training seed: the held-out mean reward before and after, their paired difference with a 95% bootstrap
interval over the images, the share of images whose reward rose, and the prompt agreement of the world's
independent judge (``shapes-judge-match``) before and after, so what the gain cost is visible. As a check that
the file holds what was trained, the diffusers-loaded LoRA's reward on the trainer's own evaluation prompts and
seeds is compared with the trainer's last evaluation.

Writes ``ddpo_jpeg_cpu.md`` and ``.json`` to ``--output`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import provenance
import torch

from finetune.checkpoint import atomic_write_text
from finetune.config import TrainConfig
from finetune.sampling import generate
from finetune.trainer import Trainer
from finetune.world import WORLD_DDPO_TRAINING, WORLD_TRAINING, split_prompts
from finetune.world.evaluate import world_sampler
from finetune.world.pipeline import load_world_pipeline
from rewards import get_reward

JUDGE = "shapes-judge-match"
"""The world's independent prompt-agreement judge (it shares no weights with the ``shapes`` classifier)."""
BOOTSTRAP = 10_000
EVAL_SEED_START = 2000


def train(seed: int, args: argparse.Namespace, runs: Path) -> dict:
    """Fine-tune one LoRA; returns its directory and the trainer's first and last held-out evaluations."""
    torch.set_num_threads(args.threads)
    train_prompts, held_out = split_prompts()
    output = runs / f"seed{seed}"
    settings = dict(
        method="ddpo",
        reward=args.reward,
        batch_size=args.batch,
        lr=args.lr,
        steps=args.steps,
        seed=seed,
        ddpo_inner_epochs=args.inner_epochs,
        ddpo_clip_range=args.clip_range,
        ddpo_min_count=args.min_count,
        eval_seeds=args.trainer_eval_seeds,
        eval_every=args.steps,
        checkpoint_every=args.steps,
        keep_checkpoints=1,
        output_dir=str(output),
        overwrite=True,
    )
    config = TrainConfig(**{**WORLD_TRAINING, **settings})  # the world's settings, as `--model world` takes them
    Trainer(load_world_pipeline(), get_reward(args.reward), config, train_prompts, held_out).train()
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row["eval_reward"] for row in rows if "eval_reward" in row]
    queries = max(row.get("reward_queries", 0) for row in rows)
    return dict(seed=seed, lora=str(output), trainer_eval=(evaluations[0], evaluations[-1]), queries=queries)


@torch.no_grad()
def held_out_scores(
    lora: str | None, prompts: list[str], seed_sets: dict[str, list[int]], scorers: dict
) -> dict[str, dict[str, torch.Tensor]]:
    """For each named set of seeds, each scorer's per-image scores of the shipped pipeline (with ``lora`` loaded by
    diffusers if given) on every prompt at every seed (prompt-major); the pipeline is loaded once."""
    pipeline = load_world_pipeline()
    if lora is not None:
        pipeline.load_lora_weights(lora)
    sampler = world_sampler(pipeline, WORLD_TRAINING["num_inference_steps"], WORLD_TRAINING["guidance_scale"])
    scores = {}
    for key, seeds in seed_sets.items():
        images = generate(sampler, prompts, seeds, batch_size=64)
        image_prompts = [p for p in prompts for _ in seeds]
        scores[key] = {name: scorer(images, image_prompts).float() for name, scorer in scorers.items()}
    return scores


def bootstrap_interval(differences: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``differences`` (resampling images)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(differences), (BOOTSTRAP, len(differences)), generator=generator)
    means = differences.double()[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def evaluate(trained: list[dict], args: argparse.Namespace) -> dict:
    """The base pipeline and every LoRA on the held-out prompts and seeds, and on the trainer's own evaluation."""
    _, held_out = split_prompts()
    seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + args.eval_seeds))
    scorers = {"reward": get_reward(args.reward), "judge": get_reward(JUDGE)}
    base = held_out_scores(None, held_out, {"held_out": seeds}, scorers)["held_out"]
    runs = []
    for run in trained:
        scores = held_out_scores(
            run["lora"], held_out, {"held_out": seeds, "own": list(args.trainer_eval_seeds)}, scorers
        )
        tuned, own = scores["held_out"], scores["own"]
        differences = tuned["reward"] - base["reward"]
        runs.append(
            dict(
                seed=run["seed"],
                queries=run["queries"],
                before=base["reward"].mean().item(),
                after=tuned["reward"].mean().item(),
                gain=differences.mean().item(),
                interval=bootstrap_interval(differences, run["seed"]),
                rose=(differences > 0).float().mean().item(),
                fell=(differences < 0).float().mean().item(),
                judge_before=base["judge"].mean().item(),
                judge_after=tuned["judge"].mean().item(),
                trainer_eval=run["trainer_eval"],
                loaded_eval=own["reward"].mean().item(),
            )
        )
    return dict(images=len(held_out) * len(seeds), prompts=held_out, seeds=seeds, runs=runs)


def report(summary: dict, args: argparse.Namespace) -> str:
    config = TrainConfig(**WORLD_TRAINING)  # the settings the flags leave as the world's
    runs = summary["runs"]
    gains = [run["gain"] for run in runs]
    lines = [
        f"# DDPO on `{args.reward}` in the embedded world",
        "",
        summary["provenance"],
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Training: `--method ddpo --reward {args.reward}`, {args.steps} rounds of {args.batch} trajectories "
        f"({args.steps * args.batch} reward queries), lr {args.lr:g}, PPO clip range {args.clip_range:g}, "
        f"{args.inner_epochs} inner epochs of {config.ddpo_minibatches} minibatches, per-prompt statistics from "
        f"{args.min_count} rewards (buffer {config.ddpo_buffer_size}), the world's other settings "
        f"({config.num_inference_steps} DDIM steps, eta {config.ddpo_eta:g}, guidance {config.guidance_scale:g}, "
        f"LoRA rank {config.lora_rank}); one process per seed, {args.threads} thread each. Wall time "
        f"{summary['minutes']:.1f} min.",
        "",
        f"Held-out measurement: the shipped pipeline and each LoRA (loaded by diffusers' `load_lora_weights`) on the "
        f"world's {len(summary['prompts'])} held-out prompts x {len(summary['seeds'])} noise seeds "
        f"({summary['seeds'][0]}-{summary['seeds'][-1]}) = {summary['images']} images each, deterministic DDIM "
        f"(eta 0). Gain: mean paired difference of `{args.reward}` (kB of JPEG; higher is better), with a 95% "
        f"bootstrap interval over the images. `{JUDGE}`: share of images whose count, colour and kind the "
        f"world's independent judge reads as the prompt says.",
        "",
        "| seed | queries | before | after | gain | 95% interval | images rose / fell | judge before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        low, high = run["interval"]
        lines.append(
            f"| {run['seed']} | {run['queries']} | {run['before']:.4f} | {run['after']:.4f} | {run['gain']:+.4f} | "
            f"[{low:+.4f}, {high:+.4f}] | {run['rose']:.0%} / {run['fell']:.0%} | "
            f"{run['judge_before']:.1%} -> {run['judge_after']:.1%} |"
        )
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    lines += [
        "",
        f"Mean gain over the {len(gains)} seeds: {statistics.mean(gains):+.4f} (std {spread:.4f}); smallest "
        f"{min(gains):+.4f}; lowest end of a seed's interval {min(run['interval'][0] for run in runs):+.4f}.",
        "",
        "The file holds what was trained: the diffusers-loaded LoRA's mean reward on the trainer's own evaluation "
        f"prompts and seeds ({', '.join(map(str, args.trainer_eval_seeds))}) against the trainer's last evaluation: "
        + ", ".join(f"seed {run['seed']} {run['loaded_eval']:.4f} vs {run['trainer_eval'][1]:.4f}" for run in runs)
        + ".",
        "",
        provenance.footer(),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="jpeg-compressibility", help="the (non-differentiable) reward")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=60, help="DDPO rounds per run")
    preset = WORLD_DDPO_TRAINING  # the defaults: what `python -m finetune train --model world --method ddpo` uses
    parser.add_argument("--batch", type=int, default=preset["batch_size"], help="trajectories per round")
    parser.add_argument("--lr", type=float, default=preset["lr"])
    parser.add_argument("--clip-range", type=float, default=preset["ddpo_clip_range"], help="PPO clip range")
    parser.add_argument("--inner-epochs", type=int, default=preset["ddpo_inner_epochs"])
    parser.add_argument(
        "--min-count", type=int, default=preset["ddpo_min_count"], help="rewards a prompt needs for its own statistics"
    )
    parser.add_argument("--eval-seeds", type=int, default=16, help="held-out noise seeds per prompt, from 2000")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--runs", type=Path, help="keep the runs (LoRA, metrics, report) here (default: temporary)")
    parser.add_argument("--output", type=Path, default=Path(provenance.ROOT, provenance.RESULTS))
    parser.add_argument("--smoke", action="store_true", help="1 round of 2 at lr 3e-2, 1 seed, 1 eval seed")
    args = parser.parse_args(argv)
    args.trainer_eval_seeds = WORLD_TRAINING["eval_seeds"]
    if args.smoke:
        args.seeds, args.steps, args.batch, args.lr, args.inner_epochs = 1, 1, 2, 3e-2, 1
        args.eval_seeds, args.min_count, args.trainer_eval_seeds = 1, 2, (1000,)
    if args.seeds < 1 or args.steps < 1 or args.eval_seeds < 1:
        parser.error("--seeds, --steps and --eval-seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = provenance.header()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp)
        jobs = [(seed, args, runs) for seed in range(args.seeds)]
        if args.jobs > 1 and args.seeds > 1:
            with multiprocessing.get_context("spawn").Pool(min(args.jobs, args.seeds)) as pool:
                trained = pool.starmap(train, jobs)
        else:
            trained = [train(*job) for job in jobs]
        summary = evaluate(trained, args)
    summary.update(
        command=" ".join(["python", "benchmarks/ddpo_jpeg.py", *(sys.argv[1:] if argv is None else argv)]),
        provenance=header,
        arguments={k: str(v) for k, v in vars(args).items()},
        minutes=(time.perf_counter() - start) / 60,
    )
    text = report(summary, args)
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output / "ddpo_jpeg_cpu.md", text)
    atomic_write_text(args.output / "ddpo_jpeg_cpu.json", json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
