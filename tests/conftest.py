"""Fixtures shared by the tests: fake Ollama backends, one HTTP client session, a private Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.fakes import FakeOllama, MakeFake
from tests.support.redisproc import own_redis

__all__ = ["fakes", "http", "own_redis"]


@pytest.fixture
async def fakes() -> AsyncIterator[MakeFake]:
    """Start fake Ollama backends (`await fakes(name="g0", ...)`); all are stopped after the test,
    held replies released first so no handler is left waiting."""
    started: list[FakeOllama] = []

    async def make(**kwargs: Any) -> FakeOllama:
        fake = await FakeOllama(**kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        if fake.hold is not None:
            fake.hold.set()
        await fake.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
