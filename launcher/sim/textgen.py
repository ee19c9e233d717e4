"""What the simulated models say: deterministic text, token counts and embeddings.

Nothing here is a language model. Output is a stream of word tokens drawn from a fixed vocabulary by
an RNG seeded from a hash of (model, prompt, seed), so the same request gives the same answer, and
its length is modest (20 to 60 tokens by default; `[sim] answer_tokens_min/max` change it) so tests
stay fast. A prompt costs about one token per four characters. Embeddings are unit vectors of the
model's embedding length, seeded by the text.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from launcher.sim import structured

MIN_TOKENS = 20
MAX_TOKENS = 60

WORDS = (
    "the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "be", "by", "this",
    "are", "or", "at", "from", "an", "have", "not", "which", "one", "model", "token", "layer", "memory", "card",
    "load", "queue", "request", "stream", "cache", "context", "batch", "time", "speed", "rig", "server", "value",
    "state", "node", "graph", "weight", "simple", "small", "large", "fast", "slow", "quiet", "clear", "bright",
    "warm", "cold", "early", "late", "river", "stone", "cloud", "field", "light", "paper", "signal", "garden",
    "window", "mountain", "harbor", "market", "forest", "engine", "answer", "question", "idea", "reason", "result",
    "example", "method", "number", "system", "process", "data", "sample", "order",
)  # fmt: skip
_PUNCT = (".", ",", ".", "!", "?", ";")


def count_tokens(text: str) -> int:
    """About one token per four characters, at least one for any non-empty text."""
    if not text:
        return 0
    return max(1, math.ceil(len(text) / 4))


def prompt_tokens_for_messages(messages: Sequence[dict[str, Any]], system: str = "") -> int:
    """Tokens a chat template renders: the contents plus a few per message for role markers."""
    total = count_tokens(system) + (4 if system else 0)
    for message in messages:
        total += count_tokens(str(message.get("content") or "")) + 4
        total += 768 * len(message.get("images") or [])  # Ollama counts an image as 768 tokens
    return total + 1


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class Completion:
    """A decided answer: its tokens and why it ended ("stop" or "length")."""

    tokens: tuple[str, ...]
    done_reason: str

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def _words(rng: random.Random, n: int, limit: int | None = None) -> list[str]:
    """An answer of `n` word tokens, of which only the first `limit` are made: the draws are sequential,
    so a cut answer is exactly the prefix of the whole one."""
    out: list[str] = []
    sentence_start = True
    for i in range(n if limit is None else min(n, limit)):
        word = rng.choice(WORDS)
        if sentence_start:
            word = word.capitalize()
        token = word if i == 0 else " " + word
        sentence_start = False
        if i > 2 and rng.random() < 0.12:
            token += rng.choice(_PUNCT)
            sentence_start = token[-1] in ".!?"
        out.append(token)
    if out and len(out) == n and out[-1][-1] not in ".!?":
        out[-1] += "."
    return out


def _cut_at_stop(tokens: Sequence[str], stop: Sequence[str]) -> list[str] | None:
    """The tokens before the first stop sequence (the last one trimmed), or None when none occurs.

    Only the tail that a new token can complete a match in is searched, so this stays linear."""
    stops = [s for s in stop if s]
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    text = ""
    for i, token in enumerate(tokens):
        start = max(0, len(text) - longest + 1)
        text += token
        window = text[start:]
        hits = [start + window.find(s) for s in stops if s in window]
        if not hits:
            continue
        kept = text[: min(hits)]
        # Re-split the kept text back into the tokens it came from (the last one trimmed).
        out, acc = [], ""
        for t in tokens[: i + 1]:
            if len(acc) + len(t) <= len(kept):
                out.append(t)
                acc += t
            else:
                if kept[len(acc) :]:
                    out.append(kept[len(acc) :])
                break
        return out
    return None


def _json_tokens(text: str) -> list[str]:
    """Split JSON text into token-sized pieces (about four characters each)."""
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def complete(
    *,
    model: str,
    prompt_key: str,
    seed: int | None,
    temperature: float,
    num_predict: int,
    stop: Sequence[str] = (),
    json_format: Any = None,
    salt: int = 0,
    length_range: tuple[int, int] = (MIN_TOKENS, MAX_TOKENS),
) -> Completion:
    """The answer to one request. `json_format` is "json" or a JSON schema (dict) for structured output.

    Same (model, prompt, seed) -> same answer. Without a seed the answer is still fixed at temperature
    0; at a temperature above 0 `salt` (a per-request random number) varies it, like sampling does.
    """
    varying = seed is None or seed < 0
    rng = random.Random(
        _seed(model, prompt_key, seed if not varying else "", salt if varying and temperature > 0 else 0)
    )
    limited = False  # num_predict cuts the answer short
    if json_format is not None:
        tokens = _json_tokens(structured.answer(rng, json_format))  # raises structured.SchemaError
    else:
        n = rng.randint(*length_range)
        limited = 0 <= num_predict < n
        tokens = _words(rng, n, num_predict if limited else None)
    reason = "stop"
    cut = _cut_at_stop(tokens, stop)
    if cut is not None:
        tokens = cut
    elif limited or 0 <= num_predict < len(tokens):
        tokens = tokens[:num_predict]
        reason = "length"
    return Completion(tuple(tokens), reason)


def embedding(model: str, text: str, dimension: int) -> list[float]:
    """A deterministic unit vector for `text`: same text and model, same vector."""
    rng = random.Random(_seed("embed", model, text))
    vec = [rng.gauss(0.0, 1.0) for _ in range(max(dimension, 1))]
    return normalize(vec)


def normalize(vec: Sequence[float]) -> list[float]:
    """L2-normalise like Ollama's `normalize` (float32 precision)."""
    norm = math.sqrt(sum(v * v for v in vec))
    scale = 1.0 / max(norm, 1e-12)
    return [_f32(v * scale) for v in vec]


def _f32(value: float) -> float:
    out: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return out


def context_tokens(model: str, text: str, count: int) -> list[int]:
    """The `context` ints /api/generate returns: `count` stable token ids for `text`."""
    rng = random.Random(_seed("ctx", model, text))
    return [rng.randrange(1, 128000) for _ in range(count)]
