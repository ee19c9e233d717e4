"""Placeholder: being written (see the issue); replaced before this lands."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.toml", help="path of config.toml")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("not implemented yet")
