"""Command line: score image files with any reward, list the zoo, export a reward to ONNX.

    python -m rewards list [PATTERN]
    python -m rewards score PATH... --reward NAME [--prompt TEXT | --prompts-file FILE] [--format table|csv|json]
                                    [--backend torch|onnx [--onnx-file FILE]]
    python -m rewards export NAME --output FILE [--image-size SIZE] [--random-weights] [--weights ...] [--option ...]

``--reward`` takes a name or a weighted mix (``aesthetic=0.7,brightness=0.3``). Folders are scanned for images
(sorted). Unreadable files are reported on stderr and skipped; the run goes on. ``--backend onnx`` scores with
onnxruntime (the ``[onnx]`` extra): an ONNX graph has a fixed image size, so the reward is exported once per image
size met, into a temporary folder; with ``--onnx-file`` one graph is used, read from FILE if it exists, else
exported there for the size of the first images.

``--help`` and argument errors import nothing heavy (no torch): arguments are checked first, and hints in error
messages are spelled as this tool's flags (``rewards.hints``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rewards import hints
from rewards.cli import build_reward_from_spec, parse_options, parse_weights

if TYPE_CHECKING:  # heavy: imported where needed, after the arguments are checked
    import torch

    from rewards.base import Reward
    from rewards.onnx import OnnxReward

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
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def check_reward_arguments(args: argparse.Namespace) -> None:
    """Check the syntax of the reward arguments before anything heavy is imported."""
    args.options, args.weight_paths = parse_options(args.option), parse_weights(args.weights)


def build_reward(args: argparse.Namespace) -> Reward:
    return build_reward_from_spec(
        args.reward, args.options, args.weight_paths, pretrained=not args.random_weights, device=args.device
    )


class OnnxScorer:
    """``--backend onnx``: scores with onnxruntime through one graph per image size, exported from the reward
    (built on first need) into ``directory``; with ``--onnx-file``, through that one file (exported there first if
    it does not exist). A prompt reward's graph turns the prompts into its prompt inputs itself."""

    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        from rewards.combine import parse_reward_spec
        from rewards.onnx import OnnxReward

        self.args, self.directory = args, directory
        self.file = Path(args.onnx_file) if args.onnx_file else None
        self.device = "cuda" if args.device and args.device.startswith("cuda") else "cpu"
        self.reward: Reward | None = None
        self.graphs: dict[tuple[int, ...], OnnxReward] = {}
        self.last_scores: dict[str, torch.Tensor] = {}
        if self.file is not None and self.file.exists():
            graph = OnnxReward(self.file, self.device)
            if graph.members != parse_reward_spec(args.reward):
                raise ValueError(f"{self.file} holds reward '{graph.name}', not '{args.reward}'")
            self.graphs[graph.image_size] = graph

    def __call__(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        from rewards.onnx import OnnxReward, export_onnx

        size = tuple(images.shape[-2:])
        if size not in self.graphs:
            if self.file is not None and self.graphs:
                height, width = next(iter(self.graphs))
                raise ValueError(
                    f"{self.file} scores {height}x{width} images and some images are {size[0]}x{size[1]}: give "
                    f"one --onnx-file per image size, or leave it out to export a graph for each size"
                )
            if self.reward is None:
                self.reward = build_reward(self.args)
            path = export_onnx(self.reward, self.file or self.directory / f"{size[0]}x{size[1]}.onnx", size)
            if self.file is not None:
                print(f"exported reward '{self.reward.name}' for {size[0]}x{size[1]} images to {path}", file=sys.stderr)
            self.graphs[size] = OnnxReward(path, self.device)
        graph = self.graphs[size]
        scores = graph(images, prompts)
        self.last_scores = graph.last_scores
        return scores


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


def score_files(
    reward: Reward | OnnxScorer, files: list[Path], prompts: list[str] | None, batch_size: int
) -> tuple[list, list]:
    """``(rows, errors)``: one row per readable file, in input order, with the score and member scores."""
    import torch
    from tqdm.auto import tqdm

    from rewards.base import Reward

    parameters = reward.parameters() if isinstance(reward, Reward) else iter(())
    device = next((t.device for t in parameters), torch.device("cpu"))
    rows: dict[int, dict] = {}
    errors: list[tuple[Path, str]] = []
    with torch.no_grad(), tqdm(total=len(files), unit="image", disable=len(files) < 32, file=sys.stderr) as bar:
        for group in batches(files, batch_size, errors):
            indices = [i for i, _ in group]
            images = torch.stack([image for _, image in group]).to(device)
            scores = reward(images, [prompts[i] for i in indices] if prompts else None)
            members = getattr(reward, "last_scores", {})  # a mix's member scores
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


def check_score(args: argparse.Namespace) -> None:
    """Check ``score``'s arguments and find its files and prompts, before anything heavy is imported."""
    if args.onnx_file and args.backend != "onnx":
        raise ValueError("--onnx-file goes with --backend onnx")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {args.batch_size}")
    check_reward_arguments(args)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"no such file or folder: {', '.join(missing)}")
    args.files = image_files(args.paths)
    if not args.files:
        raise ValueError(f"no image files found in {', '.join(args.paths)}")
    args.prompts = None
    if args.prompt is not None:
        args.prompts = [args.prompt] * len(args.files)
    elif args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {args.prompts_file}: no such file")
        args.prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(args.prompts) != len(args.files):
            raise ValueError(f"{args.prompts_file} has {len(args.prompts)} prompts for {len(args.files)} image files")


def score(args: argparse.Namespace) -> int:
    files, prompts = args.files, args.prompts
    if args.backend == "onnx":
        with tempfile.TemporaryDirectory(prefix="rewards-onnx-") as directory:
            rows, errors = score_files(OnnxScorer(args, Path(directory)), files, prompts, args.batch_size)
    else:
        rows, errors = score_files(build_reward(args), files, prompts, args.batch_size)
    write_rows(rows, args.format)
    if errors:
        print(f"{len(errors)} of {len(files)} files could not be read and were skipped", file=sys.stderr)
    return 0 if rows else 2


def check_export(args: argparse.Namespace) -> None:
    """Check ``export``'s arguments before anything heavy is imported."""
    check_reward_arguments(args)
    args.size = parse_size(args.image_size) if args.image_size else None
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; give the .onnx file to write")


def export(args: argparse.Namespace) -> int:
    from rewards.onnx import OnnxReward, export_onnx

    reward = build_reward(args)
    path = export_onnx(reward, args.output, args.size)
    height, width = OnnxReward(path).image_size
    print(f"exported reward '{reward.name}' for {height}x{width} images (any batch) to {path}")
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` or ``"512x384"`` (height x width) as ``(height, width)``."""
    try:
        height, _, width = text.lower().partition("x")
        size = int(height), int(width or height)
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise ValueError(f"--image-size {text!r}: expected a side (224) or HEIGHTxWIDTH (512x384)")
    return size


def list_zoo(pattern: str | None) -> int:
    from rewards.registry import get_entry, list_rewards

    names = list_rewards(pattern)
    width = max((len(n) for n in names), default=0)
    for name in names:
        entry = get_entry(name)
        kind = "differentiable" if entry.differentiable else "non-differentiable"
        print(f"{name:<{width}}  {kind:<18}  {entry.description}")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth showing (not for flags, lists or unset values)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def add_reward_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :func:`build_reward` reads, besides the reward itself."""
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="PATH | COMPONENT=PATH[,...]",
        help="local weights or a hub id (owner/name[@revision]): one PATH for a single-component reward, "
        "COMPONENT=PATH for the parts of another (e.g. clip=DIR,head=FILE for aesthetic); the error message of "
        "a missing download names every file",
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a reward option, e.g. target=cat"
    )
    parser.add_argument("--random-weights", action="store_true", help="random weights (no download), for tests")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rewards", description="The reward zoo.", formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    list_cmd = commands.add_parser(
        "list", help="list the registered rewards, differentiable or not", formatter_class=HelpFormatter
    )
    list_cmd.add_argument("pattern", nargs="?", default=None, help="glob filter, e.g. 'aesthetic*'")
    score_cmd = commands.add_parser("score", help="score image files or folders", formatter_class=HelpFormatter)
    score_cmd.add_argument("paths", nargs="+", help="image files or folders")
    score_cmd.add_argument(
        "--reward", required=True, help="a reward name or a mix such as 'aesthetic=0.7,contrast=0.3'"
    )
    given = score_cmd.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="one prompt for every image")
    given.add_argument("--prompts-file", help="one prompt per line, in the order of the files")
    add_reward_arguments(score_cmd)
    score_cmd.add_argument("--batch-size", type=int, default=8, help="images scored at once")
    score_cmd.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    score_cmd.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="onnx: onnxruntime")
    score_cmd.add_argument(
        "--onnx-file", help="with --backend onnx: the graph to use as it is, or to export there if it does not exist"
    )
    export_cmd = commands.add_parser(
        "export", help="export a reward's scoring graph to ONNX", formatter_class=HelpFormatter
    )
    export_cmd.add_argument("reward", metavar="NAME", help="a reward name or a mix")
    export_cmd.add_argument("--output", required=True, help="the .onnx file to write (replaced if it exists)")
    export_cmd.add_argument("--image-size", help="SIDE or HEIGHTxWIDTH (default: the reward's input size, or 512)")
    add_reward_arguments(export_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            check_score(args)
        elif args.command == "export":
            check_export(args)
        with hints.command_line():  # hints in error messages name this tool's flags
            if args.command == "list":
                return list_zoo(args.pattern)
            return export(args) if args.command == "export" else score(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
