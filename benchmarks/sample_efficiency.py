"""Sample efficiency in the embedded shapes world: held-out reward against reward queries for DRaFT-LV (n = 2),
DRaFT-K (K = 1), ReFL and DDPO, each at its own learning rate (a small sweep on a separate seed), several seeds.

    python benchmarks/sample_efficiency.py [--steps 24] [--seeds 3] [--lrs 3e-4,1e-3,3e-3] [--output DIR]
    python benchmarks/sample_efficiency.py --smoke --output DIR   # seconds: the code path, no figures worth reading
    python benchmarks/sample_efficiency.py --methods ddpo --reuse benchmarks/results/sample_efficiency.json ...

The world runs at 20 DDIM steps (so ReFL's stopping step, drawn in (0.75, 1) of T, ranges over 5 positions) on the
``shapes`` reward's size objective. For each method the sweep trains one run per learning rate on seed 100 for
``--sweep-steps`` steps and keeps the one with the largest held-out gain; then ``--seeds`` runs (seeds 0, 1, ...)
train at it for ``--steps`` steps. Reported: the reward queries each run needs to reach 50% and 80% of the best
method's mean final held-out gain (linear between evaluations), and the ratios DDPO / DRaFT-LV and DRaFT-1 /
DRaFT-LV. A run that does not reach a fraction within its budget is censored: its count is reported as more than
the budget, and a ratio with it in the numerator as a lower bound. DDPO uses the same reward as a black box, with
its own budget, batch and learning rates (``--ddpo-*``, by default the shared ones), and also trains on the
non-differentiable ``--black-box`` reward (``--black-box-seeds`` runs; 0: none) to show it works there.

``--reuse JSON`` takes the methods a recorded run measured (same world settings, checked) from its summary
instead of training them again, with its runs on non-differentiable rewards, and records that run's command and
commit next to this one's; with ``--black-box-only`` only DDPO's runs on ``--black-box`` are trained.

Writes ``sample_efficiency.png``, ``.json`` and ``.md`` to ``--output`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
from pathlib import Path

import provenance
import torch

from compose.files import atomic_write
from finetune.checkpoint import atomic_write_text
from finetune.config import METHOD_NAMES, TrainConfig
from finetune.trainer import Trainer
from finetune.world import WORLD_TRAINING, split_prompts
from finetune.world.pipeline import load_world_pipeline
from rewards import get_reward

METHODS = {
    "draft-lv": dict(method="draft-lv", lv_n=2),
    "draft-k": dict(method="draft-k", k=1),
    "refl": dict(method="refl"),
    "ddpo": dict(method="ddpo"),
}
REFERENCE = "draft-lv"
RATIOS = (("ddpo", REFERENCE), ("draft-k", REFERENCE))
REWARD = ("shapes", {"objective": "size"})
"""The differentiable objective: the classifier's size reading (0 to 1; the shipped model's samples average 0.42)."""
BLACK_BOXES = ("jpeg-compressibility", "jpeg-incompressibility", "shapes-match")
"""The non-differentiable rewards in the world DDPO can also train on (``--black-box``)."""
DDPO_SETTINGS = ("steps", "sweep_steps", "batch", "eval_every", "lrs")
"""The settings ``--ddpo-*`` can give DDPO its own value of (its budget and batch; RL needs more queries)."""
SHARED = ("sampling_steps", "eval_seeds", "held_out", "seeds")
"""Settings a reused run must share with this one (the world and the held-out measurement)."""
FRACTIONS = (0.5, 0.8)
SWEEP_SEED = 100
SAMPLING_STEPS = 20
Curve = list[dict[str, float]]
"""One run's evaluations: ``{"step", "images", "queries", "reward"}`` (held-out reward), step 0 first."""


def settings(method: str, args: argparse.Namespace) -> argparse.Namespace:
    """The arguments a method trains with: the shared ones, with DDPO's own ``--ddpo-*`` values where given."""
    if method != "ddpo":
        return args
    own = {name: getattr(args, f"ddpo_{name}") for name in DDPO_SETTINGS if getattr(args, f"ddpo_{name}") is not None}
    return argparse.Namespace(**{**vars(args), **own})


def run(method: str, reward: tuple[str, dict], lr: float, seed: int, steps: int, args: argparse.Namespace) -> Curve:
    """Train one LoRA from the shipped world pipeline; its held-out evaluations."""
    train_prompts, held_out = split_prompts()
    held_out = held_out[: args.held_out]
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            **METHODS[method],
            **({"ddpo_timestep_fraction": args.ddpo_timestep_fraction} if method == "ddpo" else {}),
            resolution=WORLD_TRAINING["resolution"],
            num_inference_steps=args.sampling_steps,
            guidance_scale=WORLD_TRAINING["guidance_scale"],
            lora_rank=WORLD_TRAINING["lora_rank"],
            weight_decay=0.0,
            batch_size=args.batch,
            lr=lr,
            steps=steps,
            seed=seed,
            eval_seeds=tuple(args.eval_seeds),
            eval_every=args.eval_every,
            checkpoint_every=steps,
            keep_checkpoints=1,
            output_dir=tmp,
            overwrite=True,
            device="cpu",
        )
        scorer = get_reward(reward[0], **reward[1])
        Trainer(load_world_pipeline(), scorer, config, train_prompts, held_out).train()
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [
        dict(
            step=row["step"],
            images=row.get("images_seen", 0),
            queries=row.get("reward_queries", 0),
            reward=row["eval_reward"],
        )
        for row in rows
        if "eval_reward" in row
    ]


def gain(curve: Curve, at: int = -1) -> float:
    """Held-out reward at evaluation ``at`` (default: the last) minus the initial one."""
    return curve[at]["reward"] - curve[0]["reward"]


def queries_to_reach(curve: Curve, target: float, axis: str = "queries") -> float | None:
    """Reward queries (or ``axis``) at which the held-out gain first reaches ``target``, linear between evaluations;
    ``None`` if it never does."""
    previous = curve[0]
    for point in curve[1:]:
        before, after = previous["reward"] - curve[0]["reward"], point["reward"] - curve[0]["reward"]
        if after >= target:
            share = (target - before) / (after - before) if after > before else 1.0
            return previous[axis] + share * (point[axis] - previous[axis])
        previous = point
    return None


def sweep(method: str, args: argparse.Namespace) -> dict:
    """Final held-out gain per learning rate on the sweep seed; the chosen (largest-gain) learning rate (no sweep
    run when there is one learning rate)."""
    if len(args.lrs) == 1:
        return dict(gains={f"{args.lrs[0]:g}": None}, lr=args.lrs[0])
    gains = {lr: gain(run(method, REWARD, lr, SWEEP_SEED, args.sweep_steps, args)) for lr in args.lrs}
    for lr, value in gains.items():
        print(f"sweep {method} lr {lr:g}: gain {value:+.4f}", flush=True)
    return dict(gains={f"{lr:g}": value for lr, value in gains.items()}, lr=max(gains, key=gains.get))


def black_box_runs(method: str, lr: float, args: argparse.Namespace) -> dict:
    """``--black-box-seeds`` runs of ``method`` on the non-differentiable ``--black-box`` reward."""
    curves = [run(method, (args.black_box, {}), lr, seed, args.steps, args) for seed in range(args.black_box_seeds)]
    print(f"{method} on {args.black_box}: gains {[round(gain(c), 4) for c in curves]}", flush=True)
    return dict(method=method, reward=args.black_box, lr=lr, curves=curves)


def train_method(method: str, args: argparse.Namespace) -> tuple[dict, dict | None]:
    """One method's sweep and seeded runs (and, for DDPO, its runs on the non-differentiable reward)."""
    torch.set_num_threads(args.threads)
    args = settings(method, args)
    chosen = sweep(method, args)
    curves = [run(method, REWARD, chosen["lr"], seed, args.steps, args) for seed in range(args.seeds)]
    print(f"{method}: gains {[round(gain(c), 4) for c in curves]}", flush=True)
    extra = None
    if method == "ddpo" and args.black_box_seeds:
        extra = black_box_runs(method, args.black_box_lr or chosen["lr"], args)
    result = dict(
        lr=chosen["lr"], sweep=chosen["gains"], curves=curves, batch=args.batch, steps=args.steps,
        sweep_steps=args.sweep_steps,
    )  # fmt: skip
    return result, extra


def thresholds(results: dict[str, dict]) -> tuple[str, float, dict]:
    """The best method (largest mean final gain), its gain, and per method and fraction the reward queries and
    images each seed needed (``None``: not reached within the budget)."""
    means = {m: statistics.mean(gain(c) for c in r["curves"]) for m, r in results.items()}
    best = max(means, key=means.get)
    reached = {
        m: {
            f"{f:g}": {axis: [queries_to_reach(c, f * means[best], axis) for c in r["curves"]] for axis in AXES}
            for f in FRACTIONS
        }
        for m, r in results.items()
    }
    return best, means[best], reached


AXES = ("queries", "images")


def ratios(reached: dict, results: dict[str, dict]) -> dict:
    """``numerator / denominator`` of the reward queries (and images) to each fraction: per seed index (seed i of
    one method against seed i of the other), their mean, min and max, and the ratio of the seeds' means.
    ``per_seed`` is ``None`` where a run did not reach the fraction. Where only numerator runs did not (censored
    at their budget, the last evaluation's count), ``bound_per_seed`` puts the budget in their place and the
    summaries are lower bounds (``lower_bound``); where a denominator run did not, the summaries are ``None``."""
    table = {}
    for numerator, denominator in RATIOS:
        if numerator not in reached or denominator not in reached:
            continue
        for fraction in reached[denominator]:
            for axis in AXES:
                top, bottom = reached[numerator][fraction][axis], reached[denominator][fraction][axis]
                budgets = [curve[-1][axis] for curve in results[numerator]["curves"]]
                bounded = [budget if a is None else a for a, budget in zip(top, budgets, strict=True)]
                per_seed = [a / b if a is not None and b else None for a, b in zip(top, bottom, strict=True)]
                bound = [a / b if b else None for a, b in zip(bounded, bottom, strict=True)]
                complete = None not in bound
                table[f"{numerator}/{denominator} {fraction} {axis}"] = dict(
                    per_seed=per_seed,
                    bound_per_seed=bound,
                    lower_bound=None in top,
                    mean=statistics.mean(bound) if complete else None,
                    min=min(bound) if complete else None,
                    max=max(bound) if complete else None,
                    of_means=statistics.mean(bounded) / statistics.mean(bottom) if complete else None,
                )
    return table


def plot(results: dict[str, dict], extra: dict[str, dict], path: Path) -> None:
    """Mean held-out gain (band: min to max over seeds) against reward queries and against images sampled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 + bool(extra)
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    for axis, x in zip(axes, AXES, strict=False):
        for method, result in results.items():
            band(axis, result["curves"], x, f"{method} (lr {result['lr']:g})")
        axis.set(xlabel=f"reward {x}" if x == "queries" else "images sampled", ylabel="held-out gain (size)")
        axis.legend()
    for reward, result in extra.items():
        band(axes[-1], result["curves"], "queries", f"{result['method']} on {reward} (lr {result['lr']:g})")
        axes[-1].set(xlabel="reward queries", ylabel="held-out gain (JPEG: kB)", title="non-differentiable rewards")
        axes[-1].legend()
    figure.suptitle("sample efficiency in the shapes world (T = 20)")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def band(axis, curves: list[Curve], x: str, label: str) -> None:
    xs = [p[x] for p in curves[0]]
    gains = [[gain(c, i) for c in curves] for i in range(len(xs))]
    (line,) = axis.plot(xs, [statistics.mean(g) for g in gains], marker="o", label=label)
    axis.fill_between(xs, [min(g) for g in gains], [max(g) for g in gains], alpha=0.2, color=line.get_color())


def fmt(value: float | None, digits: int = 0, missing: str = "not reached") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def report(summary: dict, args: argparse.Namespace) -> str:
    results, best, best_gain = summary["methods"], summary["best"], summary["best_gain"]
    budgets = "; ".join(f"{m}: {r['steps']} steps of batch {r['batch']}" for m, r in results.items())
    lines = [
        "# Sample efficiency in the embedded shapes world",
        "",
        summary["provenance"],
        "",
        f"Command: `{summary['command']}`. Reward `{REWARD[0]}` (objective size), {args.sampling_steps} DDIM steps, "
        f"guidance {WORLD_TRAINING['guidance_scale']}, LoRA rank {WORLD_TRAINING['lora_rank']}; {budgets}; "
        f"seeds 0 to {args.seeds - 1}. Held-out reward: {args.held_out} held-out prompts "
        f"x eval seeds {', '.join(map(str, args.eval_seeds))}; gain = held-out reward minus the initial one. "
        f"Reward queries count every reward evaluation in training (DRaFT-LV n=2: two per image sampled; DDPO: one "
        f"per trajectory). Learning rate per method: the largest held-out gain of a sweep on seed {SWEEP_SEED}. "
        f"CPU, {args.threads} torch thread(s).",
    ]
    if "ddpo" in results:
        d = TrainConfig()
        lines += [
            "",
            f"DDPO: PPO with the trainer's defaults ({d.ddpo_inner_epochs} inner epoch(s), {d.ddpo_minibatches} "
            f"minibatches, clip range {d.ddpo_clip_range:g}, advantage clip {d.ddpo_adv_clip:g}, per-prompt "
            f"statistics once a prompt has {d.ddpo_min_count} rewards, eta {d.ddpo_eta:g}), timestep fraction "
            f"{args.ddpo_timestep_fraction:g} of the {args.sampling_steps} sampling steps; the `{REWARD[0]}` reward "
            "called as a black box (no gradient).",
        ]
    for reused in summary["reused"]:
        lines += [
            "",
            f"Reused (not retrained): {', '.join(reused['methods'] + reused.get('black_box', []))} from "
            f"`{reused['path']}`, measured by "
            f"`{reused['command']}` at: {reused['provenance']}",
        ]
    lines += ["", "## Learning-rate sweep (held-out gain after the sweep's steps)", ""]
    lines += ["| method | sweep steps | held-out gain per learning rate | chosen |", "|---|---|---|---|"]
    for method, result in results.items():
        swept = ", ".join(f"lr {lr}: {fmt(value, 4, 'not run')}" for lr, value in result["sweep"].items())
        lines.append(f"| {method} | {result['sweep_steps']} | {swept} | {result['lr']:g} |")
    lines += [
        "",
        f"## Reward queries to reach a fraction of the best method's mean gain ({best}: {best_gain:+.4f})",
        "",
        "A run that did not reach a fraction shows `> budget` (its queries or images at the last evaluation).",
        "",
        "| method | gain per seed | mean gain | "
        + " | ".join(f"queries to {f:.0%} (per seed)" for f in FRACTIONS)
        + " | "
        + " | ".join(f"images to {f:.0%} (per seed)" for f in FRACTIONS)
        + " |",
        "|---|---|---|" + "---|" * 2 * len(FRACTIONS),
    ]
    for method, result in results.items():
        gains = [gain(c) for c in result["curves"]]
        cells = [
            ", ".join(
                fmt(v, 0, f"> {curve[-1][axis]}")
                for v, curve in zip(summary["reached"][method][f"{f:g}"][axis], result["curves"], strict=True)
            )
            for axis in AXES
            for f in FRACTIONS
        ]
        lines.append(
            f"| {method} | {', '.join(f'{g:+.4f}' for g in gains)} | {statistics.mean(gains):+.4f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "## Ratios (per seed i: seed i of one method against seed i of the other)",
        "",
        "`> x`: a lower bound (the numerator's run did not reach the fraction within its budget; the budget is used).",
        "",
    ]
    if summary["ratios"]:
        lines += ["| ratio | fraction | axis | per seed | mean (min to max) | ratio of means |", "|" + "---|" * 6]
        for key, r in summary["ratios"].items():
            name, fraction, axis = key.split(" ")
            bound = "> " if r["lower_bound"] and r["mean"] is not None else ""
            per_seed = ", ".join(
                fmt(v, 2) if v is not None or b is None else f"> {b:.2f}"
                for v, b in zip(r["per_seed"], r["bound_per_seed"], strict=True)
            )
            spread = f"{bound}{fmt(r['mean'], 2)} ({fmt(r['min'], 2)} to {fmt(r['max'], 2)})"
            of_means = bound + fmt(r["of_means"], 2)
            lines.append(f"| {name} | {float(fraction):.0%} | {axis} | {per_seed} | {spread} | {of_means} |")
    still = {m: gain(r["curves"][0], -1) > gain(r["curves"][0], -2) for m, r in results.items()} if results else {}
    rising = [m for m, up in still.items() if up]
    lines += [
        "",
        f"Saturation check: in its last evaluation interval the held-out gain of seed 0 still rose for "
        f"{', '.join(rising) or 'no method'} (of {', '.join(results)}).",
    ]
    for result in summary["black_box"].values():
        lines += ["", black_box_text(result)]
    if summary["skipped"]:
        lines += [""] + [f"Not run: `{method}`: {why}." for method, why in summary["skipped"].items()]
    lines += ["", provenance.footer(), ""]
    return "\n".join(lines)


def black_box_text(result: dict) -> str:
    """The non-differentiable runs: held-out reward before and after per seed, the gain against its spread."""
    curves = result["curves"]
    gains = [gain(c) for c in curves]
    spread = max(gains) - min(gains)
    befores = ", ".join(f"{c[0]['reward']:+.4f} -> {c[-1]['reward']:+.4f}" for c in curves)
    mean = statistics.mean(gains)
    verdict = "exceeds" if mean > spread else "does not exceed"
    rising = sum(g > 0 for g in gains)
    return (
        f"## {result['method']} on the non-differentiable `{result['reward']}`\n\n"
        f"lr {result['lr']:g}, {curves[0][-1]['queries']} reward queries per run, seeds 0 to {len(curves) - 1}. "
        f"Held-out reward (same prompts and eval seeds as above) before -> after, per seed: {befores}; gain per seed "
        f"{', '.join(f'{g:+.4f}' for g in gains)}, mean {mean:+.4f}, spread over seeds (max - min) {spread:.4f}: the "
        f"mean gain {verdict} the spread; {rising} of {len(gains)} seeds' gains are above 0."
    )


def reuse(path: Path, methods: list[str], args: argparse.Namespace) -> tuple[dict, dict, list[dict]]:
    """The recorded results of ``path`` for the methods not in ``methods`` (those are trained here), checked to
    share this run's world settings; its runs on non-differentiable rewards by reward; and where they came from."""
    recorded = json.loads(path.read_text())
    for name in SHARED:
        if recorded["arguments"][name] != str(getattr(args, name)):
            raise SystemExit(
                f"--reuse {path}: its {name} is {recorded['arguments'][name]}, this run's {getattr(args, name)}; "
                f"methods compare on one world and held-out set: pass the same --{name.replace('_', '-')}"
            )
    kept = {m: r for m, r in recorded["methods"].items() if m not in methods}
    for result in kept.values():  # the shared budget of that run
        result.setdefault("steps", int(recorded["arguments"]["steps"]))
        result.setdefault("batch", int(recorded["arguments"]["batch"]))
        result.setdefault("sweep_steps", int(recorded["arguments"]["sweep_steps"]))
    black_box = {r["reward"]: {"method": r.get("method", name), **r} for name, r in recorded["black_box"].items()}
    black_box = {reward: r for reward, r in black_box.items() if r["method"] not in methods}
    earlier = recorded.get("reused", [])  # what that run had itself reused: attributed to the run that measured it
    inherited = {name for where in earlier for name in where["methods"] + where.get("black_box", [])}
    where = dict(
        path=str(path), methods=[m for m in kept if m not in inherited], command=recorded["command"],
        provenance=recorded["provenance"], black_box=[r for r in black_box if r not in inherited],
    )  # fmt: skip
    return kept, black_box, [where, *earlier]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, among {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--sweep-steps", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="comma-separated learning rates to sweep")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=SAMPLING_STEPS)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-seeds", default="1000,1001")
    parser.add_argument("--held-out", type=int, default=12, help="how many of the 12 held-out prompts to evaluate")
    for name in DDPO_SETTINGS:
        kind = str if name == "lrs" else int
        flag = name.replace("_", "-")
        parser.add_argument(f"--ddpo-{flag}", type=kind, default=None, help=f"DDPO's own --{flag} (default: shared)")
    parser.add_argument("--ddpo-timestep-fraction", type=float, default=1.0, help="of the sampling steps, trained")
    parser.add_argument("--black-box", default=BLACK_BOXES[0], choices=BLACK_BOXES, help="non-differentiable reward")
    parser.add_argument("--black-box-seeds", type=int, default=None, help="DDPO runs on it (default --seeds; 0: none)")
    parser.add_argument("--black-box-lr", type=float, default=None, help="default: DDPO's chosen learning rate")
    parser.add_argument("--reuse", type=Path, default=None, help="a recorded summary JSON whose methods to keep")
    parser.add_argument("--black-box-only", action="store_true", help="with --reuse: train only DDPO on --black-box")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see gradient_variance.py)")
    parser.add_argument("--jobs", type=int, default=1, help="methods trained in parallel processes")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of the code path (tests)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.sweep_steps, args.seeds, args.batch, args.sampling_steps = 2, 1, 2, 2, 2
        args.eval_every, args.eval_seeds, args.held_out = 1, "1000", 2
    args.methods = args.methods.split(",")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    if args.ddpo_lrs is not None:
        args.ddpo_lrs = [float(x) for x in args.ddpo_lrs.split(",")]
    args.eval_seeds = [int(x) for x in args.eval_seeds.split(",")]
    if args.black_box_seeds is None:
        args.black_box_seeds = args.seeds
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose among {', '.join(METHODS)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.black_box_only and (args.reuse is None or args.black_box_lr is None or args.methods != ["ddpo"]):
        parser.error("--black-box-only needs --reuse (the methods' results), --black-box-lr and --methods ddpo")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = provenance.header()
    results, black_box, skipped, reused = {}, {}, {}, []
    if args.reuse is not None:
        kept, black_box, reused = reuse(args.reuse, [] if args.black_box_only else args.methods, args)
        results.update(kept)
    if args.black_box_only:
        torch.set_num_threads(args.threads)
        ddpo = settings("ddpo", args)
        black_box[args.black_box] = black_box_runs("ddpo", args.black_box_lr, ddpo)
        args.methods = []
    runnable = [m for m in args.methods if METHODS[m]["method"] in METHOD_NAMES]
    for method in sorted(set(args.methods) - set(runnable)):
        skipped[method] = "this checkout's `finetune` has no such `--method` (merge the branch that adds it)"
    for method in (m for m in METHODS if m not in args.methods and m not in results):
        skipped[method] = "not in this run's `--methods`"
    if REFERENCE not in results and REFERENCE not in runnable:
        raise SystemExit(f"no {REFERENCE} results (the ratios' reference): add it to --methods, or --reuse a run of it")
    if args.jobs > 1:  # one process per method, each single-threaded as set by --threads
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            trained = pool.starmap(train_method, [(m, args) for m in runnable])
    else:
        trained = [train_method(m, args) for m in runnable]
    for method, (result, extra) in zip(runnable, trained, strict=True):
        results[method] = result
        if extra is not None:
            black_box[extra["reward"]] = extra
    results = {m: results[m] for m in METHODS if m in results}
    best, best_gain, reached = thresholds(results)
    summary = dict(
        command=" ".join(["python", "benchmarks/sample_efficiency.py", *(sys.argv[1:] if argv is None else argv)]),
        provenance=header,
        arguments={k: str(v) for k, v in vars(args).items()},
        methods=results,
        best=best,
        best_gain=best_gain,
        reached=reached,
        ratios=ratios(reached, results),
        black_box=black_box,
        skipped=skipped,
        reused=reused,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    plot(results, black_box, args.output / "sample_efficiency.png")
    atomic_write_text(args.output / "sample_efficiency.json", json.dumps(summary, indent=1) + "\n")
    text = report(summary, args)
    atomic_write_text(args.output / "sample_efficiency.md", text)
    print(text)


if __name__ == "__main__":
    main()
