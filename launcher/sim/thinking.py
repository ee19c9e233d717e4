"""Thinking: which requests a model thinks on, and what it thinks.

As at Ollama HEAD (server/routes.go GenerateHandler/ChatHandler): a model with the "thinking"
capability thinks when `think` is unset (it becomes true) and not when it is false; the levels
"low" | "medium" | "high" | "max" all mean thinking. A model without the capability answers
`think: true` (or a level) with 400 `"<model>" does not support thinking`; `think: false` is fine.
gpt-oss takes the harmony path: its trace cannot be turned off (true/false are ignored, it thinks
at "medium"), "max" maps to "high", and the level sets how long it thinks.

The thinking text streams before the content, in `message.thinking` (chat) or `thinking`
(generate), and its tokens count in eval_count as a real model's do.
"""

from __future__ import annotations

import random
from typing import Any

from launcher.sim import textgen
from launcher.sim.models import InstalledModel

LEVELS = ("low", "medium", "high", "max")
# Tokens of thought per level (harmony); the other families think at "medium" length.
_LENGTHS = {"low": (8, 16), "medium": (20, 40), "high": (48, 80)}


def requested(think: Any) -> bool:
    """ThinkValue.Bool(): true or any level."""
    return think is True or think in LEVELS


def level(model: InstalledModel, think: Any) -> str | None:
    """The level the model thinks at for this request's `think`, or None when it does not think."""
    if "thinking" not in model.capabilities:
        return None
    if model.harmony:
        if think in ("low", "medium", "high"):
            return str(think)
        return "high" if think == "max" else "medium"
    if think is None or requested(think):
        return "medium"
    return None


def tokens(model_key: str, prompt_key: str, seed: object, think_level: str) -> list[str]:
    """The thinking text's tokens: deterministic for (model, prompt, seed, level)."""
    rng = random.Random(f"think|{model_key}|{prompt_key}|{seed}|{think_level}")
    low, high = _LENGTHS.get(think_level, _LENGTHS["medium"])
    words = ["Okay,", " the", " user", " asks"]
    words += [" " + rng.choice(textgen.WORDS) for _ in range(rng.randint(low, high) - len(words))]
    return [*words[:-1], words[-1] + "."]
