"""`corral`: one command, several subcommands. Each subcommand lives in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`. Config errors
(`ConfigError`) end the command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from launcher.facts.strictconf import ConfigError

# name -> (module, one-line help). Modules are imported only when their command runs or --help
# needs their arguments, so a broken optional dependency cannot break unrelated commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("launcher.commands.up", "start the rig: plan, start one Ollama per GPU or group, and the gateway"),
    "plan": ("launcher.commands.plan", "explain which model goes on which card (no processes started)"),
    "gateway": ("launcher.commands.gateway", "run the gateway alone, over static or registered backends"),
    "status": ("launcher.commands.status", "GPUs, backends, resident models and queues of a running rig"),
    "batch": ("launcher.commands.batch", "run a JSONL batch over the fleet: parallel, retried, resumable"),
    "top": ("launcher.commands.top", "the running rig live in the terminal (q quits; --once prints one frame)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `command` only (the one being run): the other modules'
    arguments are not needed to run it, nor to list the commands."""
    parser = argparse.ArgumentParser(
        prog="corral",
        description="One Ollama endpoint for a rig of GPUs.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="debug logging, every backend's output included"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    # The first word that names a command; only -v/--verbose, which takes no value, may precede it.
    return next((arg for arg in argv if arg in COMMANDS), None)


def setup_logging(verbosity: int) -> None:
    # INFO by default: backends becoming ready or stopping, the gateway listening.
    logging.basicConfig(
        level=logging.DEBUG if verbosity else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    setup_logging(args.verbose)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args))
    except ConfigError as e:
        print(f"corral: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
