"""Running one completion, chat or embedding on a leased runner, and timing it like Ollama reports.

Reported durations are simulated time: prompt evaluation and decode steps come straight from the
performance model, waits (queue, load, a free slot) are the simulated clock's. Overhead that is not
simulated work (parsing, writing) counts at its real length, so a warm request's load_duration looks
like Ollama's few milliseconds rather than real overhead times the speed factor.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from launcher.sim import logprobs, textgen, thinking
from launcher.sim.engine import Progress
from launcher.sim.gojson import format_time
from launcher.sim.models import InstalledModel
from launcher.sim.options import RequestOptions
from launcher.sim.scheduler import Lease
from launcher.sim.service import SimService
from launcher.sim.structured import SchemaError
from launcher.sim.wire import StreamError

RUNNER_STOPPED = (
    "model runner has unexpectedly stopped, this may be due to resource limitations or an internal error, "
    "check ollama server logs for details"
)


class RunnerStopped(Exception):
    """The runner unloaded under a request (the server is stopping); `str()` is Ollama's text."""

    def __init__(self) -> None:
        super().__init__(RUNNER_STOPPED)


def ns(seconds: float) -> int:
    return max(round(seconds * 1e9), 0)


def check_format(raw: Any) -> tuple[Any, str | None]:
    """(format, error): None, "json" or a schema dict; the error text Ollama's runner gives otherwise."""
    if raw is None or raw == "":
        return None, None
    if raw == "json":
        return "json", None
    if isinstance(raw, dict):
        return raw, None
    text = json.dumps(raw, separators=(",", ":"))
    return None, f'invalid format: {json.dumps(text)}; expected "json" or a valid JSON Schema object'


@dataclass
class RequestClock:
    """When a request started and got its runner: real seconds (time.monotonic) and simulated ones."""

    service: SimService
    start: float
    start_sim: float = 0.0
    acquired: float = 0.0
    acquired_sim: float = 0.0
    went_through_queue: bool = False

    def __post_init__(self) -> None:
        self.start_sim = self.service.clock.now()

    def mark_acquired(self, lease: Lease) -> None:
        self.acquired = time.monotonic()
        self.acquired_sim = self.service.clock.now()
        self.went_through_queue = lease.queued

    @property
    def load_s(self) -> float:
        """Ollama's load_duration: request start to runner acquired (queueing and loading included).

        A request that attached to a loaded runner waited for no simulated work of its own: its
        load_duration is its real overhead. Reading it off the shared simulated clock instead would
        multiply that overhead by the speed factor whenever other requests happen to be decoding."""
        if not self.went_through_queue:
            return max(self.acquired - self.start, 0.0)
        return max(self.acquired_sim - self.start_sim, 0.0)


@dataclass
class Generation:
    """The outcome of a completion as it streams: counts and simulated durations."""

    prompt_tokens: int
    eval_count: int = 0
    prompt_eval_s: float = 0.0
    eval_s: float = 0.0
    slot_wait_s: float = 0.0  # simulated time spent waiting for a free parallel slot
    slot_wait_wall_s: float = 0.0
    done_reason: str = "stop"
    stopped: bool = False  # the runner went away mid-generation


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _tool_call(rng: random.Random, tools: Sequence[Any], index: int) -> dict[str, Any]:
    """A call of the first tool, with an argument of the right type for each required parameter."""
    function = _mapping(_mapping(tools[0]).get("function"))
    params = _mapping(function.get("parameters"))
    props = _mapping(params.get("properties"))
    required = params.get("required")
    args: dict[str, Any] = {}
    for key in required if isinstance(required, list) else list(props):
        kind = _mapping(props.get(key)).get("type", "string")
        args[str(key)] = rng.randint(1, 10) if kind in ("integer", "number") else rng.choice(textgen.WORDS)
    call_id = "call_" + "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    return {"id": call_id, "function": {"index": index, "name": str(function.get("name", "")), "arguments": args}}


async def run_tokens(
    service: SimService,
    lease: Lease,
    gen: Generation,
    tokens: Sequence[str],
) -> AsyncIterator[str]:
    """Produce `tokens` at the model's pace on a runner slot; fills `gen`'s counts and durations."""
    runner = lease.runner
    before, before_sim = time.monotonic(), service.clock.now()
    async with runner.slots:
        gen.slot_wait_wall_s = time.monotonic() - before
        gen.slot_wait_s = service.clock.now() - before_sim
        produced = 0
        progress: Progress
        async for progress in runner.engine.generate(gen.prompt_tokens, len(tokens)):
            if progress.tokens < 0:
                gen.stopped = True
                return
            gen.prompt_eval_s += progress.prompt_eval_s
            gen.eval_s += progress.eval_s
            for token in tokens[produced : produced + progress.tokens]:
                gen.eval_count += 1
                yield token
            produced += progress.tokens


def metrics(clock: RequestClock, gen: Generation, end: float) -> dict[str, Any]:
    """api.Metrics of a finished request (zero values omitted, like Go's omitempty).

    total = load + slot wait + prompt eval + eval + the real time left over (writing the reply).
    """
    work_s = gen.prompt_eval_s + gen.eval_s
    left_over = (end - clock.acquired) - gen.slot_wait_wall_s - work_s / clock.service.clock.speed
    total = clock.load_s + gen.slot_wait_s + work_s + max(left_over, 0.0)
    out: dict[str, Any] = {
        "total_duration": ns(total),
        "load_duration": ns(clock.load_s),
        "prompt_eval_count": gen.prompt_tokens,
        "prompt_eval_duration": ns(gen.prompt_eval_s),
        "eval_count": gen.eval_count,
        "eval_duration": ns(gen.eval_s),
    }
    return {k: v for k, v in out.items() if v}


@dataclass
class CompletionCall:
    """One /api/generate or /api/chat request, ready to run."""

    requested: str  # the model name as the client wrote it (echoed in every chunk)
    model: InstalledModel
    options: RequestOptions
    prompt_key: str
    prompt_tokens: int
    json_format: Any
    chat: bool
    context_text: str | None = None  # generate: the prompt `context` encodes; None for raw or chat
    tools: Sequence[Any] = ()
    tool_turn: bool = False
    format_error: str | None = None  # what the runner answers a bad `format` with, once the model is loaded
    think_level: str | None = None  # the model thinks first, at this level (thinking.level)
    logprobs: bool = False
    top_logprobs: int = 0
    runner_error: tuple[int, str] | None = None  # what llama-server refuses the request with (images)


def num_predict_for(call: CompletionCall) -> int:
    """The token budget llama-server gets. num_predict 0 differs per route at Ollama HEAD: generate's
    /completion request omits a zero n_predict (omitempty), so the answer is open-ended; chat sends
    n_predict 0, and llama-server stops for want of budget after the first token ("length")."""
    num_predict = call.options.num_predict
    if num_predict == 0:
        return 1 if call.chat else -1
    return num_predict


def decide(
    service: SimService, call: CompletionCall, num_predict: int, salt: int = 0
) -> tuple[list[str], str, list[dict[str, Any]]]:
    """(tokens, done_reason, tool_calls) for a call: what the model will say. Raises SchemaError."""
    opts = call.options
    seed = opts.seed if opts.seed >= 0 else None
    if call.tools and call.tool_turn:
        rng = random.Random(f"{call.model.key}|{call.prompt_key}|{seed}")
        calls = [_tool_call(rng, call.tools, 0)]
        text = json.dumps(calls[0]["function"])
        return [text[i : i + 4] for i in range(0, len(text), 4)], "stop", calls
    completion = textgen.complete(
        model=call.model.key,
        prompt_key=call.prompt_key,
        seed=seed,
        temperature=opts.temperature,
        num_predict=num_predict,
        stop=opts.stop,
        json_format=call.json_format,
        salt=salt,
        length_range=(service.settings.rig.answer_tokens_min, service.settings.rig.answer_tokens_max),
    )
    return list(completion.tokens), completion.done_reason, []


async def completion_chunks(
    service: SimService, lease: Lease, clock: RequestClock, call: CompletionCall
) -> AsyncGenerator[dict[str, Any] | StreamError, None]:
    """The NDJSON chunks of a generate or chat request; releases the lease when done or abandoned.

    The lease is released in this generator's `finally`, which only runs once it has started: callers
    must iterate it (or let `send_ndjson` do so) rather than close it unstarted.
    """
    try:
        if call.format_error is not None:
            yield StreamError(call.format_error)
            return
        if call.runner_error is not None:
            yield StreamError(call.runner_error[1], call.runner_error[0])
            return
        seed = call.options.seed if call.options.seed >= 0 else None
        # Unseeded sampling above temperature 0 varies the whole answer (thinking, text, logprobs).
        salt = service.next_salt() if seed is None and call.options.temperature > 0 else 0
        varied = f"{seed}|{salt}"
        thought: list[str] = []
        if call.think_level:
            thought = thinking.tokens(call.model.key, call.prompt_key, varied, call.think_level)
        budget = num_predict_for(call)
        cut_thinking = 0 <= budget < len(thought)
        if cut_thinking:
            thought = thought[:budget]
        try:
            rest = max(budget - len(thought), 0) if budget >= 0 else -1
            tokens, reason, tool_calls = ([], "length", []) if cut_thinking else decide(service, call, rest, salt)
        except SchemaError as e:
            yield StreamError(str(e), 400)
            return
        gen = Generation(prompt_tokens=call.prompt_tokens, done_reason=reason)
        visible = [] if tool_calls else tokens
        every = thought + tokens
        entries = logprobs.for_tokens(f"{call.model.key}|{call.prompt_key}|{varied}", every, call.top_logprobs)
        position = 0
        async for token in run_tokens(service, lease, gen, every):
            index, position = position, position + 1
            if index < len(thought):
                chunk = _chunk(call, clock, "", done=False, thinking=token)
            elif tool_calls:
                continue
            else:
                chunk = _chunk(call, clock, token, done=False)
            if call.logprobs:
                chunk["logprobs"] = [entries[index]]
            yield chunk
        if gen.stopped:
            yield StreamError(RUNNER_STOPPED)
            return
        if tool_calls:
            chunk = _chunk(call, clock, "", done=False)
            chunk["message"]["tool_calls"] = tool_calls
            yield chunk
        final = _chunk(call, clock, "", done=True)
        final["done_reason"] = gen.done_reason
        if call.context_text is not None:
            final["context"] = textgen.context_tokens(
                call.model.key, call.context_text + "".join(visible), gen.prompt_tokens + gen.eval_count
            )
        final.update(metrics(clock, gen, time.monotonic()))
        yield final
    finally:
        lease.release()


def _chunk(call: CompletionCall, clock: RequestClock, text: str, *, done: bool, thinking: str = "") -> dict[str, Any]:
    stamp = format_time(clock.service.clock.wall_time())
    if call.chat:
        message = {"role": "assistant", "content": text} | ({"thinking": thinking} if thinking else {})
        return {"model": call.requested, "created_at": stamp, "message": message, "done": done}
    out = {"model": call.requested, "created_at": stamp, "response": text}
    return out | ({"thinking": thinking} if thinking else {}) | {"done": done}


def merge_chunks(chunks: Sequence[dict[str, Any]], *, chat: bool) -> dict[str, Any]:
    """The non-streaming reply: the text of all chunks with the last chunk's metadata."""
    last = dict(chunks[-1])
    entries = [e for c in chunks for e in c.get("logprobs") or []]
    if chat:
        message = {"role": last["message"].get("role", "assistant")}
        message["content"] = "".join(c["message"].get("content", "") for c in chunks)
        if thought := "".join(c["message"].get("thinking", "") for c in chunks):
            message["thinking"] = thought
        calls = [tc for c in chunks for tc in c["message"].get("tool_calls", [])]
        if calls:
            message["tool_calls"] = calls
        last["message"] = message
    else:
        head = {k: last.pop(k) for k in ("model", "created_at")}
        last.pop("response", None)
        body: dict[str, Any] = {"response": "".join(c.get("response", "") for c in chunks)}
        if thought := "".join(c.get("thinking", "") for c in chunks):
            body["thinking"] = thought
        last = head | body | last
    if entries:
        # api.Logprob follows done/done_reason (and generate's context) and precedes the metrics.
        metrics_at = next((i for i, k in enumerate(last) if k.endswith("_duration") or k.endswith("_count")), len(last))
        items = list(last.items())
        last = dict(items[:metrics_at]) | {"logprobs": entries} | dict(items[metrics_at:])
    return last


async def embed_inputs(
    service: SimService, lease: Lease, model: InstalledModel, texts: Sequence[str], *, dimensions: int = 0
) -> tuple[list[list[float]], int, float]:
    """Embed each text on a runner slot: (vectors, prompt tokens, simulated seconds). Raises RunnerStopped."""
    vectors: list[list[float]] = []
    total_tokens = 0
    total_s = 0.0

    async def one(text: str) -> tuple[list[float], int, float]:
        gen = Generation(prompt_tokens=textgen.count_tokens(text) + 2)
        async for _ in run_tokens(service, lease, gen, ()):
            pass
        if gen.stopped:
            raise RunnerStopped
        vec = textgen.embedding(model.key, text, model.spec.embedding_length)
        if 0 < dimensions < len(vec):
            vec = textgen.normalize(vec[:dimensions])
        return vec, gen.prompt_tokens, gen.prompt_eval_s

    results = await asyncio.gather(*(one(t) for t in texts))
    for vec, tokens, seconds in results:
        vectors.append(vec)
        total_tokens += tokens
        total_s += seconds
    return vectors, total_tokens, total_s
