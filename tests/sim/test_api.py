"""Ollama's API on a real `corral-sim serve` child process, through the official clients and raw HTTP."""

# The official clients type every reply field as optional; these tests assert on the values instead.
# mypy: disable-error-code="union-attr,index,operator,arg-type,call-overload"

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest

from launcher.models.gguf import encode_gguf_metadata
from launcher.sim.harness import SimServer, install_models

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
LLAMA_FILE_BYTES = 4_920_000_000  # the catalog's file size for llama3.1:8b


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    tmp = tmp_path_factory.mktemp("sim-api")
    install_models(tmp / "models", "nomic-embed-text", "qwen2.5:0.5b", "gemma2:2b")
    with SimServer.start(tmp, gpus=["RTX 4090"], speed=500, env={"OLLAMA_CONTEXT_LENGTH": "4096"}) as server:
        server.pull("llama3.1:8b")
        yield server


@pytest.fixture
def client(sim: SimServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=sim.url) as c:
        yield c


def raw(sim: SimServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


# -- basics --------------------------------------------------------------------------------------


def test_root_version_and_head(sim: SimServer) -> None:
    assert raw(sim, "GET", "/") == (200, "text/plain; charset=utf-8", b"Ollama is running")
    status, _ctype, body = raw(sim, "HEAD", "/")
    assert (status, body) == (200, b"")
    assert json.loads(raw(sim, "GET", "/api/version")[2]) == {"version": "0.33.0"}
    assert raw(sim, "HEAD", "/api/tags")[0] == 200


def test_unknown_paths_and_wrong_methods_answer_like_gin(sim: SimServer) -> None:
    assert raw(sim, "GET", "/api/nope") == (404, "text/plain", b"404 page not found")
    assert raw(sim, "POST", "/api/tags") == (405, "text/plain", b"405 method not allowed")
    assert raw(sim, "GET", "/api/generate")[0] == 405
    assert raw(sim, "HEAD", "/api/ps")[0] == 405  # /api/ps is GET only in Ollama


def test_host_check_on_loopback(sim: SimServer) -> None:
    assert raw(sim, "GET", "/", headers={"Host": "evil.example.com"})[0] == 403
    assert raw(sim, "GET", "/api/tags", headers={"Host": "attacker.com:11434"})[0] == 403
    for ok in ("localhost:11434", "127.0.0.1", "10.1.2.3:80", "gpu-box.local", "svc.internal", "[::1]:11434"):
        assert raw(sim, "GET", "/", headers={"Host": ok})[0] == 200, ok


def test_malformed_requests(sim: SimServer) -> None:
    assert raw(sim, "POST", "/api/generate") == (
        400,
        "application/json; charset=utf-8",
        b'{"error":"missing request body"}',
    )
    status, _, body = raw(sim, "POST", "/api/chat", b"{not json")
    assert status == 400 and json.loads(body)["error"].startswith("invalid character 'n'")
    status, _, body = raw(sim, "POST", "/api/generate", b'{"model": 7}')
    assert status == 400
    assert json.loads(body) == {
        "error": "json: cannot unmarshal number into Go struct field GenerateRequest.model of type string"
    }
    status, _, body = raw(sim, "POST", "/api/chat", b"{}")
    assert (status, json.loads(body)) == (400, {"error": "model is required"})
    status, _, body = raw(sim, "POST", "/api/generate", b'{"model":"llama3.1:8b","keep_alive":"3600"}')
    assert (status, json.loads(body)) == (400, {"error": 'time: missing unit in duration "3600"'})
    status, _, body = raw(sim, "POST", "/api/generate", b'{"model":"llama3.1:8b","prompt":"x","options":{"seed":"a"}}')
    assert (status, json.loads(body)) == (500, {"error": 'option "seed" must be of type integer'})


def test_unknown_model_is_404_everywhere(sim: SimServer, client: ollama.Client) -> None:
    for call in (
        lambda: client.generate(model="nope", prompt="x"),
        lambda: client.chat(model="nope", messages=[{"role": "user", "content": "x"}]),
        lambda: client.show("nope"),
        lambda: client.delete("nope"),
    ):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope", prompt="x")
    assert err.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="nope", input="x")
    assert err.value.error == 'model "nope" not found, try pulling it first'


# -- the store ------------------------------------------------------------------------------------


def test_pull_streams_progress_and_installs(sim: SimServer, client: ollama.Client) -> None:
    statuses = [p.status for p in client.pull("mistral:7b", stream=True)]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [s for s in statuses if s and s.startswith("pulling ") and s != "pulling manifest"]
    assert len(set(layers)) >= 3  # model, template, params, config...
    again = list(client.pull("mistral:7b", stream=True))
    model_line = next(p for p in again if p.digest and p.total and p.total > 1e9)
    assert model_line.completed == model_line.total  # already present: complete at once
    assert model_line.status == f"pulling {model_line.digest[7:19]}"
    names = [m.model for m in client.list().models]
    assert "mistral:7b" in names


def test_pull_of_an_unknown_model_fails_like_ollama(sim: SimServer, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError, match="pull model manifest: file does not exist"):
        client.pull("no-such-model:1b")
    status, ctype, body = raw(sim, "POST", "/api/pull", b'{"model":"no-such-model"}')
    assert (status, ctype) == (200, "application/x-ndjson")
    assert [json.loads(line) for line in body.splitlines()] == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    assert raw(sim, "POST", "/api/pull", b'{"model":"bad name!"}')[0] == 400


def test_list_shows_real_sizes_and_details(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    llama = models["llama3.1:8b"]
    assert LLAMA_FILE_BYTES <= llama.size < LLAMA_FILE_BYTES + 10_000
    assert llama.details.family == "llama" and llama.details.parameter_size == "8.0B"
    assert llama.details.quantization_level == "Q4_K_M"
    assert re.fullmatch(r"[0-9a-f]{64}", llama.digest)


def test_show(client: ollama.Client) -> None:
    shown = client.show("llama3.1:8b")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 131072
    assert shown.modelinfo["llama.block_count"] == 32
    assert list(shown.capabilities or []) == ["completion", "tools"]
    assert ".Tools" in (shown.template or "")
    assert "stop" in (shown.parameters or "")
    assert shown.modelfile.startswith('# Modelfile generated by "ollama show"')
    assert "LICENSE" in shown.modelfile
    assert list(client.show("nomic-embed-text").capabilities or []) == ["embedding"]


def test_copy_and_delete(client: ollama.Client) -> None:
    client.copy("qwen2.5:0.5b", "me/tiny:v1")
    names = {m.model for m in client.list().models}
    assert {"qwen2.5:0.5b", "me/tiny:v1"} <= names
    client.delete("me/tiny:v1")
    assert "me/tiny:v1" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("missing:1", "x:1")
    assert e.value.status_code == 404


def test_create_from_an_installed_model(sim: SimServer, client: ollama.Client) -> None:
    statuses = [
        p.status for p in client.create("pirate", from_="llama3.1:8b", system="Talk like a pirate.", stream=True)
    ]
    assert statuses[-2:] == ["writing manifest", "success"]
    assert any(s and s.startswith("using existing layer sha256:") for s in statuses)
    assert any(s and s.startswith("creating new layer sha256:") for s in statuses)
    shown = sim.json("POST", "/api/show", {"model": "pirate"})
    assert shown["system"] == "Talk like a pirate."
    assert shown["details"]["parent_model"] == "llama3.1:8b"
    assert (
        'SYSTEM "Talk like a pirate."' not in shown["modelfile"] and "SYSTEM Talk like a pirate." in shown["modelfile"]
    )
    sizes = {m.model: m.size for m in client.list().models}
    assert sizes["pirate:latest"] >= LLAMA_FILE_BYTES  # the reused model layer keeps its declared size
    assert client.generate(model="pirate", prompt="hi", options={"num_predict": 3}).eval_count == 3
    client.delete("pirate")


def test_blobs(sim: SimServer) -> None:
    data = b"some adapter bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert raw(sim, "HEAD", f"/api/blobs/{digest}")[0] == 404
    assert raw(sim, "POST", f"/api/blobs/{digest}", data)[0] == 201
    assert raw(sim, "POST", f"/api/blobs/{digest}", data)[0] == 200
    assert raw(sim, "HEAD", f"/api/blobs/{digest}")[0] == 200
    wrong = "sha256:" + "0" * 64
    status, _, body = raw(sim, "POST", f"/api/blobs/{wrong}", data)
    assert status == 400 and json.loads(body)["error"].startswith("digest mismatch")
    assert raw(sim, "HEAD", "/api/blobs/sha256:xyz")[0] == 400


# -- inference ------------------------------------------------------------------------------------


def test_generate_not_streamed(client: ollama.Client) -> None:
    r = client.generate(model="llama3.1:8b", prompt="Why is the sky blue?", options={"temperature": 0})
    assert r.done and r.done_reason == "stop" and r.response
    assert r.model == "llama3.1:8b"
    assert RFC3339_UTC.match(str(r.created_at))
    assert r.eval_count and 20 <= r.eval_count <= 60
    assert r.prompt_eval_count and r.prompt_eval_count > 0
    assert isinstance(r.total_duration, int) and isinstance(r.eval_duration, int)
    assert r.total_duration >= (r.load_duration or 0) + (r.eval_duration or 0)
    assert r.context and len(r.context) == r.prompt_eval_count + r.eval_count
    again = client.generate(model="llama3.1:8b", prompt="Why is the sky blue?", options={"temperature": 0})
    assert again.response == r.response  # deterministic at temperature 0
    seeded = client.generate(model="llama3.1:8b", prompt="Why is the sky blue?", options={"seed": 42})
    assert (
        seeded.response
        == client.generate(model="llama3.1:8b", prompt="Why is the sky blue?", options={"seed": 42}).response
    )


def test_generate_streamed_matches_the_wire_format(sim: SimServer) -> None:
    body = json.dumps({"model": "llama3.1:8b", "prompt": "Tell me", "options": {"seed": 1}}).encode()
    status, ctype, data = raw(sim, "POST", "/api/generate", body)
    assert (status, ctype) == (200, "application/x-ndjson")
    lines = [json.loads(line) for line in data.splitlines()]
    assert all(RFC3339_UTC.match(x["created_at"]) for x in lines)
    *tokens, final = lines
    assert all(list(t) == ["model", "created_at", "response", "done"] for t in tokens)
    assert final["done"] is True and final["response"] == ""
    assert list(final)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]
    assert final["eval_count"] == len(tokens)
    status, ctype, data = raw(sim, "POST", "/api/generate", json.dumps(json.loads(body) | {"stream": False}).encode())
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    assert json.loads(data)["response"] == "".join(t["response"] for t in tokens)


def test_num_predict_stop_and_json_format(client: ollama.Client) -> None:
    r = client.generate(model="llama3.1:8b", prompt="count", options={"num_predict": 5, "temperature": 0})
    assert (r.eval_count, r.done_reason) == (5, "length")
    full = client.generate(model="llama3.1:8b", prompt="count", options={"temperature": 0}).response
    word = full.split()[3]
    cut = client.generate(model="llama3.1:8b", prompt="count", options={"temperature": 0, "stop": [word]})
    assert word not in cut.response and full.startswith(cut.response) and cut.done_reason == "stop"
    doc = client.generate(model="llama3.1:8b", prompt="json please", format="json")
    assert isinstance(json.loads(doc.response), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    shaped = json.loads(
        client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "x"}], format=schema).message.content
    )
    assert set(shaped) == {"name", "age"} and isinstance(shaped["age"], int)


def test_chat_streamed_and_not(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    parts = list(client.chat(model="llama3.1:8b", messages=messages, stream=True, options={"seed": 3}))
    assert all(p.message.role == "assistant" for p in parts)
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].message.content == ""
    whole = client.chat(model="llama3.1:8b", messages=messages, options={"seed": 3})
    assert whole.message.content == "".join(p.message.content or "" for p in parts)
    assert whole.eval_count == len(parts) - 1


def test_chat_with_tools_calls_one(client: ollama.Client) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    r = client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "Weather?"}], tools=[tool])
    assert r.message.tool_calls and r.message.tool_calls[0].function.name == "get_weather"
    assert "city" in r.message.tool_calls[0].function.arguments
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="gemma2:2b", messages=[{"role": "user", "content": "x"}], tools=[tool])
    assert (e.value.status_code, e.value.error) == (400, "registry.ollama.ai/library/gemma2:2b does not support tools")


def test_embeddings(client: ollama.Client) -> None:
    r = client.embed(model="nomic-embed-text", input=["first text", "second text"])
    assert len(r.embeddings) == 2 and all(len(v) == 768 for v in r.embeddings)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in r.embeddings)
    assert r.embeddings[0] != r.embeddings[1]
    assert client.embed(model="nomic-embed-text", input="first text").embeddings[0] == r.embeddings[0]
    short = client.embed(model="nomic-embed-text", input="first text", dimensions=64)
    assert len(short.embeddings[0]) == 64
    assert r.prompt_eval_count and r.prompt_eval_count > 0
    legacy = client.embeddings(model="nomic-embed-text", prompt="first text")
    assert len(legacy.embedding) == 768
    with pytest.raises(ollama.ResponseError, match='"nomic-embed-text" does not support generate'):
        client.generate(model="nomic-embed-text", prompt="x")
    with pytest.raises(ollama.ResponseError, match="the input length exceeds the context length"):
        client.embed(model="nomic-embed-text", input="word " * 5000, truncate=False)


def test_preload_and_unload_with_empty_requests(sim: SimServer, client: ollama.Client) -> None:
    loaded = client.generate(model="qwen2.5:0.5b", prompt="")
    assert loaded.done_reason == "load"
    assert "qwen2.5:0.5b" in [m.model for m in client.ps().models]
    unloaded = client.generate(model="qwen2.5:0.5b", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    sim.wait_for(lambda s: "qwen2.5:0.5b" not in [m["model"] for m in s.ps()])
    chat_load = client.chat(model="qwen2.5:0.5b", messages=[], keep_alive=-1)
    assert chat_load.done_reason == "load"
    (entry,) = [m for m in client.ps().models if m.model == "qwen2.5:0.5b"]
    assert entry.expires_at and entry.expires_at.year > 2200  # keep_alive < 0: forever
    assert entry.context_length == 4096 and entry.size_vram == entry.size
    client.chat(model="qwen2.5:0.5b", messages=[], keep_alive=0)
    sim.wait_for(lambda s: "qwen2.5:0.5b" not in [m["model"] for m in s.ps()])


# -- OpenAI compatibility -------------------------------------------------------------------------


@pytest.fixture
def oai(sim: SimServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_openai_chat(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say something"}]
    done = oai.chat.completions.create(model="llama3.1:8b", messages=messages, seed=5)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content
    assert done.choices[0].finish_reason == "stop"
    assert done.usage and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chunks = list(
        oai.chat.completions.create(
            model="llama3.1:8b",
            messages=messages,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.completion_tokens > 0
    limited = oai.chat.completions.create(model="llama3.1:8b", messages=messages, max_tokens=4)
    assert limited.choices[0].finish_reason == "length" and limited.usage and limited.usage.completion_tokens == 4


def test_openai_completions_embeddings_and_models(oai: openai.OpenAI) -> None:
    c = oai.completions.create(model="llama3.1:8b", prompt="Once upon a time", max_tokens=6)
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length"
    streamed = list(oai.completions.create(model="llama3.1:8b", prompt="Once", max_tokens=3, stream=True))
    assert len(streamed) == 4 and streamed[-1].choices[0].finish_reason == "length"
    e = oai.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [d.index for d in e.data] == [0, 1] and len(e.data[0].embedding) == 768
    b64 = oai.embeddings.create(model="nomic-embed-text", input="a", encoding_format="base64")
    raw_bytes = base64.b64decode(str(b64.data[0].embedding))  # little-endian float32, like Ollama's
    decoded = struct.unpack(f"<{len(raw_bytes) // 4}f", raw_bytes)
    assert len(decoded) == 768 and decoded[0] == pytest.approx(e.data[0].embedding[0])
    ids = [m.id for m in oai.models.list()]
    assert "llama3.1:8b" in ids and "nomic-embed-text:latest" in ids
    model = oai.models.retrieve("llama3.1:8b")
    assert (model.id, model.owned_by) == ("llama3.1:8b", "library")


def test_openai_errors(sim: SimServer, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    status, ctype, body = raw(sim, "POST", "/v1/chat/completions", b'{"model":"llama3.1:8b","messages":[]}')
    assert (status, ctype) == (400, "application/json")
    assert json.loads(body)["error"] == {
        "message": "[] is too short - 'messages'",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    status, _, body = raw(
        sim, "POST", "/v1/embeddings", b'{"model":"nomic-embed-text","input":"a","encoding_format":"hex"}'
    )
    assert status == 400 and "encoding_format" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_sse_wire_format(sim: SimServer) -> None:
    body = json.dumps(
        {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 2}
    )
    status, ctype, data = raw(sim, "POST", "/v1/chat/completions", body.encode())
    assert (status, ctype) == (200, "text/event-stream")
    frames = data.decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(f[len("data: ") :]) for f in frames[:-2]]
    assert all(p["object"] == "chat.completion.chunk" and p["system_fingerprint"] == "fp_ollama" for p in payloads)
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert len({p["created"] for p in payloads}) == 1


def test_show_without_a_model_is_400(sim: SimServer) -> None:
    assert raw(sim, "POST", "/api/show", b"{}") == (
        400,
        "application/json; charset=utf-8",
        b'{"error":"model is required"}',
    )


def test_models_dir_layout_on_disk(sim: SimServer) -> None:
    manifest = Path(sim.models_dir) / "manifests/registry.ollama.ai/library/llama3.1/8b"
    doc = json.loads(manifest.read_text())
    model_layer = next(x for x in doc["layers"] if x["mediaType"] == "application/vnd.ollama.image.model")
    blob = Path(sim.models_dir) / "blobs" / model_layer["digest"].replace(":", "-")
    assert model_layer["size"] == LLAMA_FILE_BYTES and blob.read_bytes()[:4] == b"GGUF"


def test_a_gguf_uploaded_as_a_blob_becomes_a_model(sim: SimServer, client: ollama.Client) -> None:
    """A model the catalog does not know: its facts come from the GGUF header alone."""
    metadata = {
        "general.architecture": "phi3",
        "general.file_type": 15,
        "general.parameter_count": 3_820_000_000,
        "phi3.block_count": 32,
        "phi3.context_length": 4096,
        "phi3.embedding_length": 3072,
        "phi3.attention.head_count": 32,
        "phi3.attention.head_count_kv": 32,
        "phi3.vocab_size": 32064,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(2000)],
        "tokenizer.ggml.token_type": [1, 1],
        "phi3.rope.scaling.factors": [],
    }
    data = encode_gguf_metadata(metadata)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert raw(sim, "POST", f"/api/blobs/{digest}", data)[0] == 201
    statuses = [p.status for p in client.create("my-phi", files={"model.gguf": digest}, stream=True)]
    assert statuses[0] == "parsing GGUF" and statuses[-1] == "success"
    shown = client.show("my-phi")
    assert shown.modelinfo["general.architecture"] == "phi3"
    # Ollama reads a non-verbose show's arrays with maxArraySize 0: every non-empty one comes back null.
    assert shown.modelinfo["tokenizer.ggml.tokens"] is None
    assert shown.modelinfo["tokenizer.ggml.token_type"] is None
    assert shown.modelinfo["phi3.rope.scaling.factors"] == []
    verbose = sim.json("POST", "/api/show", {"model": "my-phi", "verbose": True})["model_info"]
    assert verbose["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(2000)]  # verbose: all of them
    assert verbose["tokenizer.ggml.token_type"] == [1, 1]
    assert shown.details.parameter_size == "3.8B" and shown.details.quantization_level == "Q4_K_M"
    reply = client.generate(model="my-phi", prompt="hello", options={"num_predict": 4})
    assert reply.eval_count == 4
    (entry,) = [m for m in client.ps().models if m.model == "my-phi:latest"]
    assert entry.context_length == 4096  # capped to the header's context length
    client.delete("my-phi")
    with pytest.raises(ollama.ResponseError) as e:
        client.create("x", files={"model.gguf": "sha256:" + "1" * 64})
    assert e.value.status_code == 500
    with pytest.raises(ollama.ResponseError, match="neither 'from' or 'files' was specified"):
        client.create("x")


def test_create_with_quantize(client: ollama.Client) -> None:
    client.create("embed-q8", from_="nomic-embed-text", quantize="q8_0")
    listed = {m.model: m for m in client.list().models}
    source, quantized = listed["nomic-embed-text:latest"], listed["embed-q8:latest"]
    assert quantized.details.quantization_level == "Q8_0"
    assert quantized.size < 0.6 * source.size  # 8.5 bits per weight instead of 16
    assert len(client.embed(model="embed-q8", input="x").embeddings[0]) == 768
    client.delete("embed-q8")
    with pytest.raises(ollama.ResponseError) as e:
        client.create("llama-q8", from_="llama3.1:8b", quantize="q8_0")
    assert (e.value.status_code, e.value.error) == (500, "quantization is only supported for F16, BF16 and F32 models")


def test_a_bad_format_fails_after_loading_and_frees_the_model(sim: SimServer, client: ollama.Client) -> None:
    """The runner rejects the format (500, as llama-server's Completion does); the request still ends, so
    keep_alive 0 unloads the model instead of leaving it pinned by a request that never finished."""
    body = {"model": "qwen2.5:0.5b", "prompt": "x", "format": "yaml", "keep_alive": 0, "stream": False}
    status, ctype, data = raw(sim, "POST", "/api/generate", json.dumps(body).encode())
    assert (status, ctype) == (500, "application/json; charset=utf-8")
    assert json.loads(data) == {"error": 'invalid format: "\\"yaml\\""; expected "json" or a valid JSON Schema object'}
    sim.wait_for(lambda s: "qwen2.5:0.5b" not in [m["model"] for m in s.ps()])


def test_create_refuses_a_license_that_is_not_text_like_ollama(sim: SimServer) -> None:
    """createModel re-decodes a non-string license into []string: anything else fails with Go's error."""
    for license_value, error in (
        (5, "json: cannot unmarshal number into Go value of type []string"),
        (["fine", {"a": 1}], "json: cannot unmarshal object into Go value of type string"),
    ):
        body = {"model": "lic", "from": "qwen2.5:0.5b", "license": license_value, "stream": False}
        status, ctype, data = raw(sim, "POST", "/api/create", json.dumps(body).encode())
        assert (status, ctype, json.loads(data)) == (500, "application/json", {"error": error})
    assert "lic:latest" not in [m["model"] for m in sim.json("GET", "/api/tags")["models"]]


def test_a_malformed_schema_still_gets_a_json_answer(client: ollama.Client) -> None:
    odd = {"type": "object", "properties": ["name"], "enum": "x", "items": 3}
    reply = client.generate(model="llama3.1:8b", prompt="x", format=odd, options={"num_predict": 200})
    assert isinstance(json.loads(reply.response), dict)
    listed = client.generate(model="llama3.1:8b", prompt="x", format={"type": "array", "items": "x"})
    assert isinstance(json.loads(listed.response), list)


def test_host_check_and_cors_details(sim: SimServer) -> None:
    # Only a Host allowed by name answers a preflight itself; an IP Host passes through to the router,
    # which has no OPTIONS route (allowedHostsMiddleware).
    assert raw(sim, "OPTIONS", "/", headers={"Host": "localhost"})[0] == 204
    assert raw(sim, "OPTIONS", "/", headers={"Host": "127.0.0.1:11434"})[0] == 405
    # net.SplitHostPort needs a port: a bracketed address without one is neither an IP nor a local name.
    assert raw(sim, "GET", "/", headers={"Host": "[::1]"})[0] == 403
    # gin-contrib/cors: an Origin naming the Host itself is not a cross-origin request.
    same = {"Host": "10.9.9.9:1234", "Origin": "http://10.9.9.9:1234"}
    assert raw(sim, "GET", "/", headers=same)[0] == 200
    assert raw(sim, "GET", "/", headers={"Host": "127.0.0.1", "Origin": "http://10.9.9.9:1234"})[0] == 403


def test_openai_reasoning_effort_and_stop_types(sim: SimServer, oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as no_think:
        oai.chat.completions.create(model="llama3.1:8b", messages=messages, reasoning_effort="high")
    assert no_think.value.body["message"] == '"llama3.1:8b" does not support thinking'
    off = oai.chat.completions.create(model="llama3.1:8b", messages=messages, reasoning_effort="none", max_tokens=2)
    assert off.choices[0].finish_reason == "length"  # think false is fine on any model
    body = {"model": "llama3.1:8b", "messages": messages, "reasoning": {"effort": "lots"}}
    status, _, data = raw(sim, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400
    assert json.loads(data)["error"]["message"] == (
        'invalid reasoning value: "lots" (must be "minimal", "low", "medium", "high", "xhigh", "ultra", "max", '
        'or "none")'
    )
    body = {"model": "llama3.1:8b", "prompt": "x", "stop": ["ok", 1]}
    status, _, data = raw(sim, "POST", "/v1/completions", json.dumps(body).encode())
    assert (status, json.loads(data)["error"]["message"]) == (400, "invalid type for 'stop' field: float64")


def test_conflicting_source_suffixes_are_a_400(sim: SimServer) -> None:
    name = "llama3.1:8b:local:cloud"
    expected = {"error": f'use either :local or :cloud, not both: "{name}"'}
    for path, body in (
        ("/api/generate", {"model": name, "prompt": "x"}),
        ("/api/chat", {"model": name, "messages": []}),
        ("/api/embed", {"model": name, "input": "x"}),
        ("/api/embeddings", {"model": name, "prompt": "x"}),
        ("/api/show", {"model": name}),
        ("/api/pull", {"model": name}),
    ):
        status, _, data = raw(sim, "POST", path, json.dumps(body).encode())
        assert (status, json.loads(data)) == (400, expected), path
    local = sim.json("POST", "/api/generate", {"model": "llama3.1:8b:local", "prompt": "x", "stream": False})
    assert local["done"] and local["model"] == "llama3.1:8b:local"


def test_create_from_files_tells_a_projector_from_the_model(sim: SimServer, client: ollama.Client) -> None:
    model = encode_gguf_metadata(
        {
            "general.architecture": "gemma3",
            "general.file_type": 15,
            "gemma3.block_count": 26,
            "gemma3.context_length": 32768,
            "gemma3.embedding_length": 1152,
            "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 1,
        }
    )
    projector = encode_gguf_metadata(
        {"general.architecture": "clip", "general.type": "mmproj", "clip.has_vision_encoder": True}
    )
    files = {}
    for name, data in (("model.gguf", model), ("mmproj.gguf", projector)):  # the projector last
        files[name] = "sha256:" + hashlib.sha256(data).hexdigest()
        assert raw(sim, "POST", f"/api/blobs/{files[name]}", data)[0] == 201
    statuses = [p.status for p in client.create("seeing", files=files, stream=True)]
    assert statuses.count("parsing GGUF") == 2 and statuses[-1] == "success"
    shown = client.show("seeing")
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert list(shown.capabilities or []) == ["completion", "vision"]
    client.delete("seeing")
