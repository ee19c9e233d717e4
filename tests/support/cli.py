"""`corral gateway` as a child process of a test, run as a user runs it from the repository."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


async def corral_gateway(*args: str, stdout: int = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    """`python -m launcher.commands.cli gateway ARGS`, stderr piped; without the API-key variables
    of the test's own environment, so only what the test configures applies."""
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_API_KEYS", "CORRAL_ADMIN_KEYS")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "launcher.commands.cli",
        "gateway",
        *args,
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )
