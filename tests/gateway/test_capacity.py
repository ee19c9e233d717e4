"""GET /api/corral/capacity: the fleet's slots per model, readable with a client key."""

from __future__ import annotations

import aiohttp

from gateway.api.auth import ApiKeys
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import MakeFake, fast_settings

USER_KEY = "user-key-capacity-1"
ADMIN_KEY = "admin-key-capacity-1"


async def test_a_client_key_reads_the_slots_of_resident_copies_and_of_cards_that_could_load_it(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    hot = await fakes(name="g0", resident={"llama3.1:8b": 8192})
    cold = await fakes(name="g1")  # installed, not loaded: it can load it when the queue makes it worth it
    other = await fakes(name="g2", models={"qwen2.5:7b": 4_700_000_000})  # not installed there
    settings = fast_settings(
        hot.backend(num_parallel=4, vram_gb=24),
        cold.backend(num_parallel=2, vram_gb=24),
        other.backend(num_parallel=8, vram_gb=24),
    )
    keys = ApiKeys(api=(USER_KEY,), admin=(ADMIN_KEY,))
    auth = {"Authorization": f"Bearer {USER_KEY}"}
    async with GatewayServer(settings, MemoryStore(), keys=keys) as gw:
        async with http.get(gw.url + "/api/corral/status", headers=auth) as resp:
            assert resp.status == 403  # the full status stays admin-only
        async with http.get(gw.url + "/api/corral/capacity", params={"model": "llama3.1:8b"}, headers=auth) as resp:
            assert resp.status == 200
            row = (await resp.json())["models"]["llama3.1:8b"]
        assert row["slots"] == 6 and row["free_slots"] == 6 and row["in_flight"] == 0
        assert row["resident_copies"] == 1 and row["backends"] == {"g0": 4, "g1": 2}
        async with http.get(gw.url + "/api/corral/capacity", params={"model": "llama3.1"}, headers=auth) as resp:
            assert (await resp.json())["models"]["llama3.1:latest"]["slots"] == 0  # another tag: nowhere
        async with http.get(gw.url + "/api/corral/capacity", headers=auth) as resp:
            every = (await resp.json())["models"]
        assert every["qwen2.5:7b"]["backends"] == {"g2": 8} and every["llama3.1:8b"]["slots"] == 6
        async with http.get(gw.url + "/api/corral/capacity") as resp:
            assert resp.status == 401  # still needs a key
