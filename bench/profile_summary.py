"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) of the ingest server.

``ingest_bench.py --profile DIR`` writes one such file per ingest scenario; this prints where
the samples went: by leaf function (self), by function anywhere on the stack (inclusive) and by
package. C code (msgspec, hashlib, uvloop's loop and the socket syscalls) has no frame of its
own: its time is counted in the Python function that called it (``Runner.run`` stands for the
event loop itself).

Inclusive shares of coroutines are lower bounds: a coroutine resumed by the event loop is
sampled with its own frame as the root of the stack, not below its caller.

Usage: ``python bench/profile_summary.py PROFILE.txt [--top 25] [--per-unit-us X]``, where X
(optional) is the server CPU µs per event or request during the profile: shares are then also
given in µs.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _short_file(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = "stdlib/" + path.split("/", 1)[1]
            break
    return path


def _key(frame: str, with_line: bool) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame or "(unknown)"
    where = _short_file(match["file"])
    if with_line and match["line"]:
        where += f":{match['line']}"
    return f"{match['func']} ({where})"


def _package(frame: str) -> str:
    match = _FRAME.match(frame)
    path = match["file"] if match else frame
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/router/" in path or path.startswith("router/"):
        return "router (with the msgspec/hashlib C calls it makes)"
    if "asyncio/runners" in path:
        return "event loop (uvloop C, socket syscalls)"
    if "asyncio/" in path:
        return "asyncio (Python)"
    return _short_file(path) or "(unknown)"


def summarise(path: Path, top: int = 25, per_unit_us: float | None = None) -> str:
    own: collections.Counter[str] = collections.Counter()
    own_lines: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[_key(frames[-1], False)] += count
        own_lines[_key(frames[-1], True)] += count
        packages[_package(frames[-1])] += count
        for name in {_key(frame, False) for frame in frames}:
            inclusive[name] += count
    if not total:
        return f"{path}: no samples"

    def share(n: int) -> str:
        text = f"{n / total * 100:5.1f}%"
        if per_unit_us is not None:
            text += f" {n / total * per_unit_us:6.2f} µs"
        return text

    out = [f"{path}: {total} samples" + (f"; 100% = {per_unit_us:.2f} µs" if per_unit_us else "")]
    out.append("-- by package (leaf frame)")
    out += [f"  {share(n)}  {name}" for name, n in packages.most_common(10)]
    out.append("-- self (leaf function)")
    out += [f"  {share(n)}  {name}" for name, n in own.most_common(top)]
    out.append("-- self by line")
    out += [f"  {share(n)}  {name}" for name, n in own_lines.most_common(top // 2)]
    out.append("-- inclusive")
    out += [f"  {share(n)}  {name}" for name, n in inclusive.most_common(top + 10)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--per-unit-us", type=float)
    args = parser.parse_args()
    sys.stdout.write(summarise(args.profile, args.top, args.per_unit_us) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
