"""Log probabilities of the simulated tokens, in Ollama's shape (api.Logprob).

Each generated token gets `{"token", "logprob", "bytes"}` and, when `top_logprobs` > 0, that many
alternatives (`top_logprobs`: the same three fields) led by the token itself. The numbers are a
proper distribution: the chosen token holds a probability between 0.4 and 0.99, the alternatives
share what is left, each half the one before, so every alternative ranks below the chosen token
and the probabilities never sum past 1. All of it is seeded by the request, so a fixed seed gives
the same numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from launcher.sim.textgen import WORDS


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def for_token(rng: random.Random, token: str, top: int) -> dict[str, Any]:
    """The Logprob of one token, with `top` alternatives when top > 0."""
    chosen = 0.4 + rng.random() * 0.59
    out = _entry(token, math.log(chosen))
    if top > 0:
        lead = " " if token.startswith(" ") else ""
        alternatives = [w for w in WORDS if lead + w != token]
        rng.shuffle(alternatives)
        rest, alts = 1.0 - chosen, [dict(out)]
        for i, word in enumerate(alternatives[: top - 1]):
            alts.append(_entry(lead + word, math.log(rest * 0.5 ** (i + 1))))
        out["top_logprobs"] = alts
    return out


def for_tokens(seed: str, tokens: Sequence[str], top: int) -> list[dict[str, Any]]:
    """Logprobs of a whole answer: one entry per token, deterministic for `seed`."""
    rng = random.Random(f"logprobs|{seed}")
    return [for_token(rng, token, top) for token in tokens]


def openai_completion_logprobs(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's `choices[].logprobs` of a chat completion: Ollama sends its entries as `content`."""
    return {"content": list(entries)}
