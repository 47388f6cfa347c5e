"""Command line: score image files with any reward, and list the zoo.

    python -m rewards list [PATTERN]
    python -m rewards score PATH... --reward NAME [--prompt TEXT | --prompts-file FILE] [--format table|csv|json]

``--reward`` takes a name or a weighted mix (``aesthetic=0.7,brightness=0.3``). Folders are scanned for images
(sorted). Unreadable files are reported on stderr and skipped; the run goes on.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from rewards.base import Reward
from rewards.combine import CombinedReward, combine, parse_reward_spec
from rewards.registry import get_entry, get_reward, list_rewards

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(paths: list[str]) -> list[Path]:
    """Files given directly, plus image files found (recursively, sorted) in the folders given."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def load_image(path: Path) -> torch.Tensor:
    """An image file as a float [3, H, W] tensor in [0, 1] (RGB; alpha dropped)."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def build_reward(args: argparse.Namespace) -> Reward:
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    named = dict(item.split("=", 1) for item in args.weights if "=" in item)
    plain = [item for item in args.weights if "=" not in item]
    if (named and plain) or len(plain) > 1:
        raise ValueError("--weights: give one PATH, or COMPONENT=PATH for each component to override")
    weights = plain[0] if plain else named or None
    pretrained = not args.random_weights
    names = parse_reward_spec(args.reward)
    if len(names) == 1 and next(iter(names.values())) == 1.0:
        name = next(iter(names))
        return get_reward(name, pretrained, weights=weights, device=args.device, **options)
    if weights is not None or options:
        raise ValueError("--weights and --option apply to a single reward; build mixes with options in Python")
    return combine(names, pretrained=pretrained, device=args.device)


def batches(files: list[Path], size: int, errors: list[tuple[Path, str]]) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Groups of up to ``size`` readable images of one shape, as (index, image); unreadable files go to errors."""
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for index, path in enumerate(files):
        try:
            image = load_image(path)
        except Exception as err:  # any decoder failure: report and go on
            errors.append((path, f"{type(err).__name__}: {err}"))
            print(f"skipped {path}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        group = pending.setdefault(tuple(image.shape), [])
        group.append((index, image))
        if len(group) == size:
            yield pending.pop(tuple(image.shape))
    yield from pending.values()


def score_files(reward: Reward, files: list[Path], prompts: list[str] | None, batch_size: int) -> tuple[list, list]:
    """``(rows, errors)``: one row per readable file, in input order, with the score and member scores."""
    from tqdm.auto import tqdm

    device = next((t.device for t in reward.parameters()), torch.device("cpu"))
    rows: dict[int, dict] = {}
    errors: list[tuple[Path, str]] = []
    with torch.no_grad(), tqdm(total=len(files), unit="image", disable=len(files) < 32, file=sys.stderr) as bar:
        for group in batches(files, batch_size, errors):
            indices = [i for i, _ in group]
            images = torch.stack([image for _, image in group]).to(device)
            scores = reward(images, [prompts[i] for i in indices] if prompts else None)
            members = reward.last_scores if isinstance(reward, CombinedReward) else {}
            for row, index in enumerate(indices):
                rows[index] = {"path": str(files[index]), "score": scores[row].item()}
                rows[index].update({key: value[row].item() for key, value in members.items()})
            bar.update(len(group))
        bar.update(len(errors))
    return [rows[i] for i in sorted(rows)], errors


def write_rows(rows: list[dict], format: str) -> None:
    if format == "json":
        print(json.dumps(rows, indent=2))
        return
    columns = list(rows[0]) if rows else ["path", "score"]
    if format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return
    width = max([len(columns[0]), *(len(r["path"]) for r in rows)])
    print("  ".join([f"{columns[0]:<{width}}", *(f"{c:>12}" for c in columns[1:])]))
    for row in rows:
        print("  ".join([f"{row['path']:<{width}}", *(f"{row[c]:>12.5g}" for c in columns[1:])]))


def score(args: argparse.Namespace) -> int:
    files = image_files(args.paths)
    if not files:
        raise ValueError(f"no image files found in {', '.join(args.paths)}")
    prompts = None
    if args.prompt is not None:
        prompts = [args.prompt] * len(files)
    elif args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if len(prompts) != len(files):
            raise ValueError(f"{args.prompts_file} has {len(prompts)} prompts for {len(files)} image files")
    reward = build_reward(args)
    rows, errors = score_files(reward, files, prompts, args.batch_size)
    write_rows(rows, args.format)
    if errors:
        print(f"{len(errors)} of {len(files)} files could not be read and were skipped", file=sys.stderr)
    return 0 if rows else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards", description="The differentiable reward zoo.")
    commands = parser.add_subparsers(dest="command", required=True)
    list_cmd = commands.add_parser("list", help="list the registered rewards")
    list_cmd.add_argument("pattern", nargs="?", default=None, help="glob filter, e.g. 'aesthetic*'")
    score_cmd = commands.add_parser("score", help="score image files or folders")
    score_cmd.add_argument("paths", nargs="+", help="image files or folders")
    score_cmd.add_argument(
        "--reward", required=True, help="a reward name or a mix such as 'aesthetic=0.7,contrast=0.3'"
    )
    given = score_cmd.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="one prompt for every image")
    given.add_argument("--prompts-file", help="one prompt per line, in the order of the files")
    score_cmd.add_argument("--weights", action="append", default=[], help="PATH, hub id, or COMPONENT=PATH")
    score_cmd.add_argument("--option", action="append", default=[], help="reward option KEY=VALUE, e.g. target=cat")
    score_cmd.add_argument("--random-weights", action="store_true", help="random weights (pretrained=False)")
    score_cmd.add_argument("--device", default=None)
    score_cmd.add_argument("--batch-size", type=int, default=8)
    score_cmd.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args = parser.parse_args(argv)

    if args.command == "list":
        names = list_rewards(args.pattern)
        width = max((len(n) for n in names), default=0)
        for name in names:
            print(f"{name:<{width}}  {get_entry(name).description}")
        return 0
    try:
        return score(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
