"""Command line: ``python -m rewards list [PATTERN]`` prints the zoo with a one-line description each."""

from __future__ import annotations

import argparse
import sys

from rewards.registry import get_entry, list_rewards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards", description="The differentiable reward zoo.")
    commands = parser.add_subparsers(dest="command", required=True)
    list_cmd = commands.add_parser("list", help="list the registered rewards")
    list_cmd.add_argument("pattern", nargs="?", default=None, help="glob filter, e.g. 'aesthetic*'")
    args = parser.parse_args(argv)

    if args.command == "list":
        names = list_rewards(args.pattern)
        width = max((len(n) for n in names), default=0)
        for name in names:
            print(f"{name:<{width}}  {get_entry(name).description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
