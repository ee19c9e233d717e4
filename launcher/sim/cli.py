"""`corral-sim`: the simulated `ollama serve`.

    corral-sim serve      serve Ollama's API over the simulated cards (environment as for `ollama serve`)
    corral-sim version    print the Ollama version being simulated

Environment errors print one line and exit with status 2, like a config error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from launcher.sim.env import EnvError, load_serve_settings
from launcher.sim.service import VERSION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral-sim",
        description="A simulated `ollama serve`: Ollama's API and scheduler over a performance model of real GPUs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="start the simulated server (reads OLLAMA_HOST, OLLAMA_MODELS, CUDA_VISIBLE_DEVICES, ...)",
        description=(
            "Start the simulated server. It reads the environment `ollama serve` reads (OLLAMA_HOST, "
            "OLLAMA_MODELS, CUDA_VISIBLE_DEVICES, OLLAMA_NUM_PARALLEL, OLLAMA_KEEP_ALIVE, "
            "OLLAMA_MAX_LOADED_MODELS, OLLAMA_MAX_QUEUE, OLLAMA_SCHED_SPREAD, OLLAMA_CONTEXT_LENGTH, "
            "OLLAMA_KV_CACHE_TYPE) plus CORRAL_SIM_RIG (TOML file with the [sim] cards, default ./config.toml) "
            "and CORRAL_SIM_SPEED (time factor, 50 = fifty times faster than real time)."
        ),
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub.add_parser("version", help="print the simulated Ollama version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"ollama version is {VERSION} (corral-sim)")
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose or os.environ.get("OLLAMA_DEBUG") else logging.INFO,
        format="time=%(asctime)s level=%(levelname)s source=corral-sim msg=%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    try:
        settings = load_serve_settings(os.environ)
    except EnvError as e:
        print(f"corral-sim: {e}", file=sys.stderr)
        return 2
    from launcher.sim.server import serve  # aiohttp is only needed to serve

    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
