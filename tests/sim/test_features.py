"""Today's models and features on a real `corral-sim serve` child, through the official clients:
structured outputs, logprobs, thinking, tools on qwen3, fill-in-middle, images, the new catalog."""

# The official clients type every reply field as optional; these tests assert on the values instead.
# mypy: disable-error-code="union-attr,index,operator,arg-type,call-overload,attr-defined"

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import math
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import gguf
import numpy
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from launcher.facts.catalog_today import TODAY
from launcher.sim.harness import SimServer, install_models

SEEDED = {"seed": 11}  # unseeded sampling varies the answer, thinking included, as a real model's does
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    tmp = tmp_path_factory.mktemp("sim-features")
    names = ("qwen3:0.6b", "gpt-oss:20b", "deepseek-r1:1.5b", "llama3.1:8b", "codellama:7b-code", "gemma3:4b")
    install_models(tmp / "models", *names, "qwen2.5-coder:0.5b", "gemma3:1b")
    with SimServer.start(tmp, gpus=["H100 80GB"], speed=500, env={"OLLAMA_CONTEXT_LENGTH": "4096"}) as server:
        yield server


@pytest.fixture
def client(sim: SimServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=sim.url) as c:
        yield c


@pytest.fixture
def oai(sim: SimServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="ollama", max_retries=0) as c:
        yield c


# -- structured outputs --------------------------------------------------------------------------


class Mood(StrEnum):
    happy = "happy"
    grumpy = "grumpy"


class Address(BaseModel):
    street: str
    zip_code: str = Field(min_length=5, max_length=5)


class Friend(BaseModel):
    name: str
    age: int = Field(ge=0, le=120)
    is_available: bool
    mood: Mood
    address: Address
    nickname: str | None = None
    tags: list[str] = Field(min_length=1, max_length=3)


class FriendList(BaseModel):
    friends: list[Friend]


def test_pydantic_round_trip_with_defs_and_refs(client: ollama.Client) -> None:
    schema = FriendList.model_json_schema()
    assert "$defs" in schema  # pydantic's shape: nested models by $ref
    for model in ("llama3.1:8b", "qwen3:0.6b"):
        seeded = {"seed": 3}
        reply = client.chat(model=model, messages=[{"role": "user", "content": "friends?"}], format=schema,
                            options=seeded)  # fmt: skip
        friends = FriendList.model_validate_json(reply.message.content)
        assert friends.friends
        streamed = "".join(
            part.message.content
            for part in client.chat(
                model=model, messages=[{"role": "user", "content": "friends?"}], format=schema, stream=True,
                options=seeded,
            )
        )
        assert FriendList.model_validate_json(streamed) == friends  # same answer streamed and not
    generated = client.generate(model="llama3.1:8b", prompt="a friend", format=Friend.model_json_schema())
    Friend.model_validate_json(generated.response)


def test_format_json_and_openai_response_formats(client: ollama.Client, oai: openai.OpenAI) -> None:
    assert isinstance(json.loads(client.generate(model="llama3.1:8b", prompt="x", format="json").response), dict)
    messages = [{"role": "user", "content": "x"}]
    reply = oai.chat.completions.create(model="llama3.1:8b", messages=messages, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    parsed = oai.beta.chat.completions.parse(model="llama3.1:8b", messages=messages, response_format=Friend)
    assert isinstance(parsed.choices[0].message.parsed, Friend)


def test_a_schema_llama_server_cannot_convert_fails_like_it(client: ollama.Client) -> None:
    broken = {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}, "required": ["a"]}
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "x"}], format=broken)
    assert err.value.status_code == 400
    assert err.value.error.startswith("JSON schema conversion failed")


# -- logprobs ------------------------------------------------------------------------------------


def _check_entries(entries: list, top: int) -> None:
    assert entries
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs or []) == top
        if top:
            assert entry.top_logprobs[0].token == entry.token
            assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-9


def test_logprobs_on_generate_and_chat(sim: SimServer, client: ollama.Client) -> None:
    # ollama-python's Logprob drops `bytes`: read the raw reply for the whole shape.
    body = {"model": "llama3.1:8b", "prompt": "hi", "logprobs": True, "top_logprobs": 2, "stream": False}
    first = sim.json("POST", "/api/generate", body)["logprobs"][0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert first["bytes"] == list(first["token"].encode())
    assert set(first["top_logprobs"][1]) == {"token", "logprob", "bytes"}
    opts = {"seed": 7}
    reply = client.generate(model="llama3.1:8b", prompt="hi", logprobs=True, top_logprobs=3, options=opts)
    _check_entries(reply.logprobs, 3)
    assert "".join(e.token for e in reply.logprobs) == reply.response
    again = client.generate(model="llama3.1:8b", prompt="hi", logprobs=True, top_logprobs=3, options=opts)
    assert again.logprobs == reply.logprobs  # deterministic for a seed
    chat = client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    _check_entries(chat.logprobs, 0)
    parts = list(client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                             top_logprobs=2, stream=True))  # fmt: skip
    streamed = [e for p in parts for e in (p.logprobs or [])]
    _check_entries(streamed, 2)
    assert not client.generate(model="llama3.1:8b", prompt="hi").logprobs
    with pytest.raises(ollama.ResponseError, match="top_logprobs must be between 0 and 20"):
        client.generate(model="llama3.1:8b", prompt="hi", logprobs=True, top_logprobs=21)


def test_openai_logprobs(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    reply = oai.chat.completions.create(model="llama3.1:8b", messages=messages, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 for c in content)
    completion = oai.completions.create(model="llama3.1:8b", prompt="hi", logprobs=2)
    assert completion.choices[0].logprobs is not None


# -- thinking ------------------------------------------------------------------------------------


def test_thinking_models_think_unless_told_not_to(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "why?"}]
    for model in ("qwen3:0.6b", "deepseek-r1:1.5b"):
        assert "thinking" in client.show(model).capabilities
        unset = client.chat(model=model, messages=messages, options=SEEDED)
        assert unset.message.thinking and unset.message.content
        same = client.chat(model=model, messages=messages, think=True, options=SEEDED)
        assert same.message.thinking == unset.message.thinking  # unset means true
        off = client.chat(model=model, messages=messages, think=False)
        assert not off.message.thinking and off.message.content
        generated = client.generate(model=model, prompt="why?")
        assert generated.thinking and generated.response
    # Streamed: every thinking chunk comes before the first content chunk.
    kinds = [
        "t" if p.message.thinking else "c"
        for p in client.chat(model="qwen3:0.6b", messages=messages, stream=True)
        if p.message.thinking or p.message.content
    ]
    assert "t" in kinds and "c" in kinds and "".join(kinds).find("c") > "".join(kinds).rfind("t")


def test_gpt_oss_levels_and_non_thinking_models(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "why?"}]
    lengths = {}
    for level in ("low", "medium", "high", "max"):
        reply = client.chat(model="gpt-oss:20b", messages=messages, think=level, options=SEEDED)
        lengths[level] = len(reply.message.thinking.split())
    assert lengths["low"] < lengths["medium"] < lengths["high"] == lengths["max"]  # harmony maps max to high
    assert client.chat(model="gpt-oss:20b", messages=messages, think=False).message.thinking  # cannot be turned off
    with pytest.raises(ollama.ResponseError, match=r"\"llama3\.1:8b\" does not support thinking") as err:
        client.chat(model="llama3.1:8b", messages=messages, think=True)
    assert err.value.status_code == 400
    assert not client.chat(model="llama3.1:8b", messages=messages, think=False).message.thinking


def test_openai_reasoning_effort(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "why?"}]
    reply = oai.chat.completions.create(model="qwen3:0.6b", messages=messages, reasoning_effort="low")
    assert reply.choices[0].message.reasoning  # Ollama's field name on the OpenAI route
    off = oai.chat.completions.create(model="qwen3:0.6b", messages=messages, reasoning_effort="none")
    assert not getattr(off.choices[0].message, "reasoning", None)


# -- tools, fill-in-middle, images ---------------------------------------------------------------


def test_tools_on_qwen3(client: ollama.Client) -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
          a: the first
          b: the second
        """
        return a + b

    reply = client.chat(model="qwen3:0.6b", messages=[{"role": "user", "content": "1+2?"}], tools=[add])
    call = reply.message.tool_calls[0]
    assert call.function.name == "add" and set(call.function.arguments) == {"a", "b"}


def test_fill_in_middle_on_a_code_model(client: ollama.Client) -> None:
    for model in ("codellama:7b-code", "qwen2.5-coder:0.5b"):
        assert "insert" in client.show(model).capabilities
        assert client.generate(model=model, prompt="def f(x):", suffix="    return y").response
    with pytest.raises(ollama.ResponseError, match="does not support insert"):
        client.generate(model="llama3.1:8b", prompt="def f(x):", suffix="    return y")


def test_images_on_vision_and_text_models(client: ollama.Client) -> None:
    assert "vision" in client.show("gemma3:4b").capabilities
    seen = client.chat(model="gemma3:4b", messages=[{"role": "user", "content": "what?", "images": [PNG]}])
    assert seen.message.content and seen.prompt_eval_count > 768
    assert "vision" not in client.show("gemma3:1b").capabilities
    with pytest.raises(ollama.ResponseError, match="does not support multimodal requests") as err:
        client.chat(model="gemma3:1b", messages=[{"role": "user", "content": "what?", "images": [PNG]}])
    assert err.value.status_code == 400


# -- the rest ------------------------------------------------------------------------------------


def test_num_predict_zero_per_route(client: ollama.Client) -> None:
    generated = client.generate(model="llama3.1:8b", prompt="x", options={"num_predict": 0})
    assert generated.eval_count > 1 and generated.done_reason == "stop"  # n_predict omitted: open-ended
    chat = client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "x"}], options={"num_predict": 0})
    assert (chat.eval_count, chat.done_reason) == (1, "length")  # n_predict 0: llama-server stops after one


def test_show_tensors_model_info_and_debug_render(sim: SimServer, client: ollama.Client) -> None:
    shown = sim.json("POST", "/api/show", {"model": "qwen3:0.6b"})  # ollama-python's ShowResponse drops tensors
    names = {t["name"] for t in shown["tensors"]}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.27.ffn_down.weight", "output.weight"} <= names
    info = client.show("qwen3:0.6b").modelinfo
    assert info["qwen3.feed_forward_length"] == 3072 and info["tokenizer.ggml.model"] == "gpt2"
    assert "qwen3.rope.freq_base" in info and info["tokenizer.ggml.tokens"] is None
    verbose = sim.json("POST", "/api/show", {"model": "qwen3:0.6b", "verbose": True})["model_info"]
    assert len(verbose["tokenizer.ggml.tokens"]) == 151936
    moe = sim.json("POST", "/api/show", {"model": "gpt-oss:20b"})["tensors"]
    assert any(t["name"] == "blk.0.ffn_gate_exps.weight" and t["shape"][-1] == 32 for t in moe)
    body = json.dumps({"model": "llama3.1:8b", "prompt": "hello", "_debug_render_only": True})
    rendered = sim.json("POST", "/api/generate", json.loads(body))
    assert "hello" in rendered["_debug_info"]["rendered_template"] and "eval_count" not in rendered
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=30)
    try:
        conn.request("GET", "/api/version")
        assert conn.getresponse().getheader("Server") is None
    finally:
        conn.close()


def test_every_new_catalog_entry_pulls_by_its_bare_name(tmp_path_factory: pytest.TempPathFactory) -> None:
    bare = sorted({spec.name.split(":")[0] for spec in TODAY})
    tmp = tmp_path_factory.mktemp("sim-pull")
    with SimServer.start(tmp, speed=100000, sim={"download_mbps": 100000}) as server, ollama.Client(server.url) as c:
        for name in bare:
            assert c.pull(name).status == "success", name
        listed = {m.model for m in c.list().models}
        assert {f"{name}:latest" for name in bare} <= listed
        assert "thinking" in c.show("gpt-oss").capabilities and "tools" in c.show("qwen3").capabilities


def test_show_lists_a_real_files_own_tensors(sim: SimServer, client: ollama.Client, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 256), ("embedding_length", 8)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_uint32("llama.attention.head_count", 2)
    writer.add_tensor("token_embd.weight", numpy.zeros((16, 8), dtype=numpy.float32))  # numpy order: [vocab, embd]
    writer.add_tensor("blk.0.attn_norm.weight", numpy.zeros(8, dtype=numpy.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert sim.request("POST", f"/api/blobs/{digest}", data)[0] == 201
    assert client.create("tiny", files={"model.gguf": digest}).status == "success"
    tensors = sim.json("POST", "/api/show", {"model": "tiny"})["tensors"]
    assert tensors == [
        {"name": "token_embd.weight", "type": "F32", "shape": [8, 16]},  # GGUF order: [embd, vocab]
        {"name": "blk.0.attn_norm.weight", "type": "F16", "shape": [8]},
    ]
