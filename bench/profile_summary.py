"""Summarise py-spy's raw (collapsed) stacks: where each service spends its CPU.

    python -m bench.profile_summary bench/results/profile/profile/messaging.txt [--top 25]

py-spy records with ``--nonblocking`` and without ``--idle``, so every sample
is a moment the process was on the CPU. Inclusive time counts a function once
per sample however often it recurs in the stack.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _key(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    return f"{match['name']} ({match['file']})"


def summarise(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_key(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for key in set(frames):
            inclusive[key] += n
    return total, own, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="only inclusive rows containing this")
    args = parser.parse_args()
    for path in args.files:
        total, own, inclusive = summarise(path)
        print(f"== {path} : {total} samples on CPU (100 Hz)")
        print("-- self time")
        for key, n in own.most_common(args.top):
            print(f"{100 * n / total:6.1f}%  {key}")
        print("-- inclusive time" + (f" (matching {args.match!r})" if args.match else ""))
        rows = [(k, n) for k, n in inclusive.most_common() if args.match in k]
        for key, n in rows[: args.top]:
            print(f"{100 * n / total:6.1f}%  {key}")


if __name__ == "__main__":
    main()
