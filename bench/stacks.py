"""Summarize py-spy raw (collapsed) stacks: the functions that take the most samples, self and total.

Usage: python -m bench.stacks FILE [--top N] [--filter SUBSTRING]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# py-spy frames look like "function (path/to/module.py:123)"; the line is dropped to merge a function.
_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    name = _LINE.sub(")", frame.strip())
    return name.replace(str(Path.cwd()) + "/", "")


def summarize(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    total, own, inclusive = 0, Counter[str](), Counter[str]()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return total, own, inclusive


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--filter", default="", help="only functions whose name contains this")
    args = p.parse_args(argv)
    total, own, inclusive = summarize(args.file)
    print(f"{total} samples")
    for title, counts in (("self", own), ("total (inclusive)", inclusive)):
        print(f"\n-- {title}")
        shown = [(f, n) for f, n in counts.most_common() if args.filter in f][: args.top]
        for f, n in shown:
            print(f"{100 * n / max(1, total):5.1f} %  {f}")


if __name__ == "__main__":
    main()
