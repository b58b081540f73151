"""What the scripts that write a file from the code share: write it, or check it is current."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def write_or_check(target: Path, make: Callable[[], str], description: str, argv: list[str] | None) -> int:
    """``--check``: 1 (and a message naming the script to rerun) when ``target`` differs from what
    ``make()`` gives now, else 0; without it, write ``target``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = ap.parse_args(argv)
    text = make()
    root = target.parents[2] if target.parent.name == "base" else target.parents[1]
    shown = target.relative_to(root)
    if args.check:
        if not target.exists() or target.read_text() != text:
            print(f"{shown} is out of date: rerun the script that writes it ({description})")
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {shown}")
    return 0
