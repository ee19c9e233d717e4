"""Today's features through the gateway, on a real simulated backend: the official client's
structured outputs, logprobs and thinking arrive intact, streamed and not, and a new catalog model
pulls by its bare name."""

# mypy: disable-error-code="union-attr,index,operator,arg-type,call-overload"

from __future__ import annotations

import asyncio
from pathlib import Path

import ollama
from pydantic import BaseModel

from gateway.state.memory import MemoryStore
from launcher.sim.harness import install_models
from tests.gateway.test_over_sim import gateway, record_for, start_sim


class Step(BaseModel):
    explanation: str
    output: str


class Solution(BaseModel):
    steps: list[Step]
    final_answer: str


async def test_structured_logprobs_and_thinking_through_the_gateway(tmp_path: Path) -> None:
    install_models(tmp_path / "models", "qwen3:0.6b")
    sim = await start_sim(tmp_path, "g0", ["H100 80GB"], {"OLLAMA_CONTEXT_LENGTH": "4096"})
    try:
        store = MemoryStore()
        await store.put_backend(record_for(sim, "g0", ["H100 80GB"], 80, num_parallel=1, default_num_ctx=4096))
        async with gateway(store) as gw, ollama.AsyncClient(host=gw.url) as client:
            messages = [{"role": "user", "content": "solve 8x + 7 = -23"}]
            reply = await client.chat(model="qwen3:0.6b", messages=messages, format=Solution.model_json_schema())
            assert Solution.model_validate_json(reply.message.content).steps
            assert reply.message.thinking  # qwen3 thinks when `think` is unset
            parts = [p async for p in await client.chat(model="qwen3:0.6b", messages=messages, stream=True,
                                                         logprobs=True, top_logprobs=2)]  # fmt: skip
            assert all(len(e.top_logprobs) == 2 for p in parts for e in p.logprobs or [])
            assert sum(len(p.logprobs or []) for p in parts) == parts[-1].eval_count
            generated = await client.generate(model="qwen3:0.6b", prompt="hi", think=False, logprobs=True)
            assert not generated.thinking and "".join(e.token for e in generated.logprobs) == generated.response
            progress = [p async for p in await client.pull("embeddinggemma", stream=True)]
            assert progress[-1].status == "success"
            embedded = await client.embed(model="embeddinggemma", input="hello")
            assert len(embedded.embeddings[0]) == 768
    finally:
        await asyncio.to_thread(sim.stop)
