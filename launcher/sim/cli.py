"""Placeholder: being written (see the issue); replaced before this lands."""

from __future__ import annotations

import sys


def main() -> int:
    print("corral-sim: not implemented yet", file=sys.stderr)
    return 1
