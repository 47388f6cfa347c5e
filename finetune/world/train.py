"""Rebuild the embedded world's shipped weights: ``python -m finetune.world.train {classifier,judge,pipeline,decoder}``.

``pipeline`` runs all three stages of the world pipeline (VAE, denoiser, decoder refinement); ``decoder`` runs only
the third on an existing pipeline directory, with the same seed, so it gives the same weights. ``judge`` trains the
independent judge (``shapes-judge``: another architecture, seed 1, its own scene streams). Everything is
seeded; the defaults are the settings of the shipped files (their model cards and ``provenance.json`` files record
the command, seed and commit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rewards.shapes.classifier import WEIGHTS_FILE
from rewards.shapes.judge import JUDGE_WEIGHTS_FILE


def git_commit() -> str:
    """The working tree's commit (with ``+dirty`` when it has changes), or ``unknown`` outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.strip() + ("+dirty" if dirty.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.world.train", description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("classifier", "judge", "pipeline", "decoder"))
    parser.add_argument("--output", type=Path, help="where to write (default: the shipped location)")
    parser.add_argument("--steps", type=int, help="training steps (default: the shipped setting)")
    parser.add_argument("--seed", type=int, help="random seed (default: the shipped setting, 1 for judge, else 0)")
    args = parser.parse_args(argv)
    command = "python -m finetune.world.train " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = git_commit()  # before training: the code that produced the weights
    steps = {"steps": args.steps} if args.steps else {}
    if args.part in ("classifier", "judge"):
        from finetune.world.classifier import CLASSIFIER, JUDGE, train_classifier

        recipe, output = (JUDGE, JUDGE_WEIGHTS_FILE) if args.part == "judge" else (CLASSIFIER, WEIGHTS_FILE)
        args.seed = recipe.seed if args.seed is None else args.seed
        output = args.output or output
        metrics = train_classifier(output, recipe, **steps, seed=args.seed)
    elif args.part == "pipeline":
        from finetune.world import SHIPPED_PIPELINE
        from finetune.world.pipeline import train_pipeline

        args.seed = args.seed or 0
        output = args.output or SHIPPED_PIPELINE
        metrics = train_pipeline(output, **steps, seed=args.seed)
    else:
        from finetune.world import SHIPPED_PIPELINE
        from finetune.world.pipeline import refine_decoder_of

        args.seed = args.seed or 0
        output = args.output or SHIPPED_PIPELINE
        earlier = json.loads((output / "provenance.json").read_text())  # the save replaces the directory
        metrics = refine_decoder_of(output, **steps, seed=args.seed)
    provenance = {"command": command, "seed": args.seed, "commit": commit, **metrics}
    print(json.dumps(provenance, indent=2))
    record = output.parent / f"{output.stem}.provenance.json" if output.suffix else output / "provenance.json"
    if args.part == "decoder":  # a later stage of an existing pipeline: keep its record, add this one
        provenance = {**earlier, "decoder_refinement": provenance}
    record.write_text(json.dumps(provenance, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
