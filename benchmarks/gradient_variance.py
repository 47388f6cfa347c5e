"""Variance of the LoRA gradient by method, the mechanism behind DRaFT's claim that DRaFT-LV (n = 2) is about twice
as sample-efficient as DRaFT-1: at one fixed LoRA state and one fixed prompt batch, the trainer's own gradient
(``Trainer.backward``, grads zeroed between draws) is drawn many times, and the trace of its covariance is compared
across DRaFT-1, DRaFT-LV with n = 1, 2, 4 and ReFL, with each method's cost per step.

    python benchmarks/gradient_variance.py [--draws 48] [--batch 4] [--settings world,sd] [--output DIR]

What varies between draws: each draw is one training step's random draws from its own seeded generator (draw d
uses seed ``--seed + d`` for every method, so draw d of every method starts from the same initial noise): the
initial noise of every image, DRaFT-LV's re-noising of x0 and ReFL's stopping step. The prompt batch and the LoRA
state are fixed. (DDIM with eta = 0 is deterministic, so DRaFT-1's gradient varies only through the initial noise.)
With ``--fixed-noise`` the initial noise is fixed too, and only the re-noising and the stopping step vary.

Writes ``gradient_variance.md`` and ``gradient_variance.json`` to ``--output`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import provenance
import torch

from finetune.checkpoint import atomic_write_text
from finetune.config import TrainConfig
from finetune.methods import BatchRandom
from finetune.pipelines import build_random_pipeline
from finetune.trainer import Trainer
from finetune.world import WORLD_TRAINING, split_prompts
from finetune.world.pipeline import load_world_pipeline
from rewards import get_reward

METHODS = {
    "DRaFT-1": dict(method="draft-k", k=1),
    "DRaFT-LV n=1": dict(method="draft-lv", lv_n=1),
    "DRaFT-LV n=2": dict(method="draft-lv", lv_n=2),
    "DRaFT-LV n=4": dict(method="draft-lv", lv_n=4),
    "ReFL": dict(method="refl"),
}
"""The compared estimators and their trainer settings (ReFL stops in the default range (0.75, 1) of T)."""
RATIO = ("DRaFT-LV n=2", "DRaFT-1")
THREADS_HELP = (
    "torch threads (default 1: on the shared 2-core machine a step with 2 threads took 10 to 20 times longer than "
    "with 1, the threads waiting for each other)"
)
REWARD = ("shapes", {"objective": "size"})
"""The reward of both settings: the shapes classifier's size reading (differentiable, no download)."""
SETTINGS = {
    "world": dict(
        title="embedded shapes world (`--model world`, 32 px)",
        pipeline=load_world_pipeline,
        config=dict(resolution=WORLD_TRAINING["resolution"], guidance_scale=WORLD_TRAINING["guidance_scale"]),
    ),
    "sd": dict(
        title="random SD pipeline `tiny` (`build_random_pipeline`, 64 px)",
        pipeline=lambda: build_random_pipeline("tiny", seed=0),
        config=dict(resolution=64, guidance_scale=7.5),
    ),
}


def trainer_for(setting: str, method: dict, args: argparse.Namespace) -> Trainer:
    """A trainer on a freshly built pipeline of ``setting`` (its LoRA added from the same seed) for one method."""
    config = TrainConfig(
        **SETTINGS[setting]["config"],
        **method,
        num_inference_steps=args.sampling_steps,
        lora_rank=WORLD_TRAINING["lora_rank"],
        lr=WORLD_TRAINING["lr"],
        weight_decay=0.0,
        batch_size=args.batch,
        seed=args.seed,
        device="cpu",
        output_dir=str(args.output / "unused"),
    )
    prompts = split_prompts()[0]
    reward = get_reward(REWARD[0], **REWARD[1])
    return Trainer(SETTINGS[setting]["pipeline"](), reward, config, prompts, prompts)


def lora_state(setting: str, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The fixed LoRA state: ``--warmup`` DRaFT-1 training steps from the initial LoRA (whose zero B factors would
    make every A factor's gradient exactly zero)."""
    trainer = trainer_for(setting, METHODS["DRaFT-1"], args)
    for _ in range(args.warmup):
        trainer.train_step()
    return {name: p.detach().clone() for name, p in trainer.named_params.items()}


def draw_gradients(
    trainer: Trainer, state: dict[str, torch.Tensor], prompts: list[str], args: argparse.Namespace
) -> tuple[torch.Tensor, list[float], int]:
    """``--draws`` gradients [draws, parameters] of one method at ``state``, the seconds of each step's forward and
    backward, and the reward queries of one step."""
    with torch.no_grad():
        for name, p in trainer.named_params.items():
            p.copy_(state[name])
    fixed = BatchRandom(torch.Generator().manual_seed(args.seed), len(prompts)).normal(trainer.latent_shape)
    gradients, seconds, queries = [], [], 0
    for draw in range(args.draws):
        trainer.optimizer.zero_grad(set_to_none=True)
        rng = BatchRandom(torch.Generator().manual_seed(args.seed + draw), len(prompts))
        noise = rng.normal(trainer.latent_shape)  # drawn first, as in a training step, even when fixed
        start = time.perf_counter()
        scores, _ = trainer.backward(prompts, fixed if args.fixed_noise else noise, rng)
        seconds.append(time.perf_counter() - start)
        queries = len(scores)
        gradients.append(torch.cat([p.grad.flatten() for p in trainer.named_params.values()]).double())
    trainer.optimizer.zero_grad(set_to_none=True)
    return torch.stack(gradients), seconds, queries


def moments(gram: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trace of the sample covariance (divisor D - 1) and the unbiased estimate of ``||E g||^2`` for resampled draws
    (``counts[b, i]``: how often bootstrap sample b takes draw i), from the Gram matrix of the draws alone."""
    draws = counts.shape[1]
    squares = counts @ gram.diagonal()
    mean_sq = torch.einsum("bi,ij,bj->b", counts, gram, counts) / draws**2
    trace = (squares - draws * mean_sq) / (draws - 1)
    return trace, mean_sq - trace / draws


def summarise(gradients: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, dict]:
    """Per method: the variance (trace of the covariance), ``||E g||^2``, the normalised variance and their 95%
    bootstrap intervals; the bootstrap resamples draws jointly across methods (draw d shares its initial noise)."""
    draws = args.draws
    generator = torch.Generator().manual_seed(args.seed)
    picks = torch.randint(draws, (args.bootstrap, draws), generator=generator)
    counts = torch.zeros(args.bootstrap, draws, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones_like(picks, dtype=torch.float64)
    )
    every = torch.ones(1, draws, dtype=torch.float64)
    result, samples = {}, {}
    for name, g in gradients.items():
        gram = g @ g.T
        trace, mean_sq = (x.item() for x in moments(gram, every))
        boot_trace, boot_mean_sq = moments(gram, counts)
        samples[name] = boot_trace
        result[name] = dict(
            variance=trace,
            variance_ci=interval(boot_trace),
            mean_norm_sq=mean_sq,
            normalised_variance=trace / mean_sq if mean_sq > 0 else float("inf"),
            normalised_variance_ci=interval(boot_trace / boot_mean_sq.clamp_min(1e-300)),
        )
    for name in gradients:
        result[name]["ratio_to_draft1"] = result[name]["variance"] / result["DRaFT-1"]["variance"]
        result[name]["ratio_to_draft1_ci"] = interval(samples[name] / samples["DRaFT-1"])
    return result


def interval(values: torch.Tensor) -> list[float]:
    """The 2.5% and 97.5% quantiles (resamples of identical draws, 0 / 0, left out)."""
    return torch.nanquantile(values.float(), torch.tensor([0.025, 0.975])).tolist()


def measure(setting: str, args: argparse.Namespace) -> dict:
    state = lora_state(setting, args)
    prompts = split_prompts()[0][: args.batch]
    gradients, costs = {}, {}
    for name, method in METHODS.items():
        trainer = trainer_for(setting, method, args)
        gradients[name], seconds, queries = draw_gradients(trainer, state, prompts, args)
        costs[name] = dict(seconds_per_step=sum(seconds[1:]) / max(1, len(seconds) - 1), reward_queries=queries)
        print(f"{setting} {name}: {args.draws} draws, {costs[name]['seconds_per_step']:.2f} s/step", flush=True)
    if args.save_gradients:
        from safetensors.torch import save_file

        path = args.save_gradients.with_name(f"{args.save_gradients.stem}_{setting}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: g.contiguous() for name, g in gradients.items()}, str(path))
    stats = summarise(gradients, args)
    for name in METHODS:
        stats[name].update(costs[name])
    parameters = next(iter(gradients.values())).shape[1]
    return dict(title=SETTINGS[setting]["title"], parameters=parameters, prompts=prompts, methods=stats)


def report(results: dict, args: argparse.Namespace, command: str, header: str) -> str:
    varying = "LV re-noising and ReFL stopping step" if args.fixed_noise else "initial noise, LV re-noising, ReFL stop"
    lines = [
        "# Gradient variance by method",
        "",
        header,
        "",
        f"Command: `{command}`. Reward `{REWARD[0]}` ({', '.join(f'{k}={v}' for k, v in REWARD[1].items())}), "
        f"T = {args.sampling_steps} DDIM steps (eta 0), LoRA rank {WORLD_TRAINING['lora_rank']}, batch "
        f"{args.batch} prompts (fixed), LoRA state after {args.warmup} DRaFT-1 steps (fixed). {args.draws} draws "
        f"per method; what varies between draws: {varying} (draw d: seed {args.seed} + d, the same for every "
        f"method). Variance = trace of the sample covariance of the flattened LoRA gradient; normalised = variance "
        f"/ ||E g||^2 (unbiased estimate of the squared mean). 95% intervals: paired bootstrap over draws "
        f"({args.bootstrap} resamples). Seconds: one step's forward and backward (the first draw, which warms up, "
        f"left out), on a shared CPU, "
        f"{args.threads} torch thread(s).",
        "",
    ]
    for result in results.values():
        lines += [
            f"## {result['title']}, {result['parameters']:,} LoRA parameters",
            "",
            "| method | variance (95% CI) | ratio to DRaFT-1 (95% CI) | normalised variance (95% CI) | s/step | "
            "reward queries/step |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in result["methods"].items():
            lines.append(
                f"| {name} | {m['variance']:.3e} ({m['variance_ci'][0]:.2e} to {m['variance_ci'][1]:.2e}) | "
                f"{m['ratio_to_draft1']:.2f} ({m['ratio_to_draft1_ci'][0]:.2f} to {m['ratio_to_draft1_ci'][1]:.2f}) "
                f"| {m['normalised_variance']:.2f} ({m['normalised_variance_ci'][0]:.2f} to "
                f"{m['normalised_variance_ci'][1]:.2f}) | {m['seconds_per_step']:.2f} | {m['reward_queries']} |"
            )
        lv, one = (result["methods"][name] for name in RATIO)
        low, high = lv["ratio_to_draft1_ci"]
        lines += [
            "",
            f"Variance ratio {RATIO[0]} / {RATIO[1]}: **{lv['ratio_to_draft1']:.2f}** (95% CI {low:.2f} to "
            f"{high:.2f}); cost per step {lv['seconds_per_step'] / one['seconds_per_step']:.2f}x in seconds and "
            f"{lv['reward_queries'] / one['reward_queries']:.0f}x in reward queries. (DRaFT's claim, as mechanism: "
            "lower variance at about 10% more cost per step; a ratio near 0.5 would match its 2x.)",
            "",
        ]
    lines += [provenance.footer(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="world,sd", help="comma-separated: world, sd")
    parser.add_argument("--draws", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="DRaFT-1 steps that set the fixed LoRA state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--fixed-noise", action="store_true", help="keep the initial noise fixed across draws")
    parser.add_argument("--save-gradients", type=Path, help="also write the drawn gradients (safetensors)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown or args.draws < 3:
        parser.error(f"settings must be among {', '.join(SETTINGS)} (got {unknown}) and --draws at least 3")
    header = provenance.header()
    results = {setting: measure(setting, args) for setting in settings}
    command = " ".join(["python", "benchmarks/gradient_variance.py", *sys.argv[1:]])
    args.output.mkdir(parents=True, exist_ok=True)
    text = report(results, args, command, header)
    payload = dict(command=command, provenance=header, arguments={k: str(v) for k, v in vars(args).items()})
    atomic_write_text(args.output / "gradient_variance.json", json.dumps({**payload, "results": results}, indent=1))
    atomic_write_text(args.output / "gradient_variance.md", text)
    print(text)


if __name__ == "__main__":
    main()
