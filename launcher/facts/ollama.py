"""Ollama's own rules, written once: how it reads durations, keep_alive and its environment, and
how many models it keeps per GPU. Each rule names the Ollama source it follows (HEAD).

The gateway, the planner, the launcher and the simulator all read these; a second copy of any of
them would let the router and the simulated backend disagree about what Ollama does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

# server/sched.go: with OLLAMA_MAX_LOADED_MODELS unset, Ollama keeps up to 3 models per GPU
# (defaultModelsPerGPU), and 3 on a CPU-only machine.
MODELS_PER_GPU = 3

# envconfig.KeepAlive and api.Duration: 5 minutes when unset.
DEFAULT_KEEP_ALIVE_S = 300.0
FOREVER_S = math.inf  # a negative keep_alive: Ollama stores MaxInt64 nanoseconds

_UNITS_S = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def default_max_loaded_models(gpu_count: int) -> int:
    """OLLAMA_MAX_LOADED_MODELS when unset: 3 per visible GPU (3 on CPU only)."""
    return MODELS_PER_GPU * max(gpu_count, 1)


def _go_quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def parse_go_duration(text: str) -> float:
    """Go's `time.ParseDuration`, in seconds ("1h30m", "-5m", "250ms", "0").

    Raises ValueError with Go's exact message for anything Go rejects: a bare number other than 0,
    a missing or unknown unit, spaces, non-ASCII digits.
    """
    orig, s, neg = text, text, False
    if s and s[0] in "+-":
        neg, s = s[0] == "-", s[1:]
    if s == "0":
        return 0.0
    invalid = ValueError("time: invalid duration " + _go_quote(orig))
    if not s:
        raise invalid
    total = 0.0
    while s:
        if not (s[0] == "." or (s[0].isascii() and s[0].isdigit())):
            raise invalid
        i = 0
        while i < len(s) and s[i].isascii() and s[i].isdigit():
            i += 1
        whole, s = s[:i], s[i:]
        frac = ""
        if s.startswith("."):
            j = 1
            while j < len(s) and s[j].isascii() and s[j].isdigit():
                j += 1
            frac, s = s[1:j], s[j:]
            if not whole and not frac:
                raise invalid
        elif not whole:
            raise invalid
        k = 0
        while k < len(s) and not (s[k] == "." or (s[k].isascii() and s[k].isdigit())):
            k += 1
        if k == 0:
            raise ValueError("time: missing unit in duration " + _go_quote(orig))
        unit, s = s[:k], s[k:]
        if unit not in _UNITS_S:
            raise ValueError("time: unknown unit " + _go_quote(unit) + " in duration " + _go_quote(orig))
        total += float(f"{whole or 0}.{frac or 0}") * _UNITS_S[unit]
    return -total if neg else total


def api_keep_alive_s(value: object) -> float | None:
    """A request's `keep_alive` as `api.Duration.UnmarshalJSON` reads it, in seconds: a number is
    seconds, a string a Go duration; negative means forever (`FOREVER_S`). None when absent.

    Raises ValueError for other types (Ollama: "Unsupported type: '<type>'") and bad strings.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    seconds = float(value) if isinstance(value, int | float) else parse_go_duration(value)
    return FOREVER_S if seconds < 0 else seconds


def is_zero_keep_alive(value: object) -> bool:
    """keep_alive 0 in any of Ollama's spellings (0, 0.0, "0", "0s", "0m"): unload now."""
    try:
        return api_keep_alive_s(value) == 0
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """"host:port" as OLLAMA_HOST and URLs want it: an IPv6 address goes in brackets
    (envconfig.Host() would read "::1:11500" as a host without a port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def env_var(environ: Mapping[str, str], key: str) -> str:
    """envconfig.Var: the value trimmed of surrounding spaces, then of surrounding quotes."""
    return environ.get(key, "").strip().strip("\"'")


def env_keep_alive_s(text: str) -> float:
    """OLLAMA_KEEP_ALIVE as envconfig.KeepAlive reads it: a Go duration, else an integer number of
    seconds; negative means forever. Raises ValueError where Ollama would fall back to 5 minutes
    (Corral refuses such a value instead of silently running with another keep_alive)."""
    try:
        seconds = parse_go_duration(text)
    except ValueError:
        stripped = text[1:] if text[:1] in "+-" else text
        if not (stripped.isascii() and stripped.isdigit()):
            raise ValueError(f"not a duration: {text!r}") from None
        seconds = float(int(text))
    return FOREVER_S if seconds < 0 else seconds


def env_uint(environ: Mapping[str, str], key: str) -> int | None:
    """An unsigned integer variable as envconfig.Uint reads it (strconv.ParseUint: ASCII digits only).
    None when unset; raises ValueError for a value Ollama would warn about and ignore."""
    raw = env_var(environ, key)
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"{key} must be a non-negative integer, got {raw!r}")
    return int(raw)


def context_length_env(environ: Mapping[str, str]) -> int:
    """OLLAMA_CONTEXT_LENGTH as the backend reads it; 0 when unset or unusable (Ollama's default)."""
    try:
        return env_uint(environ, "OLLAMA_CONTEXT_LENGTH") or 0
    except ValueError:
        return 0


# -- automatic context ---------------------------------------------------------------------------

GIB = 1024**3

# server/routes.go Serve (since v0.15.5): with OLLAMA_CONTEXT_LENGTH unset, the default num_ctx by
# the backend's total VRAM (each GPU's TotalMemory minus OLLAMA_GPU_OVERHEAD): (at least, context).
VRAM_CONTEXT_TIERS: tuple[tuple[int, int], ...] = ((47 * GIB, 262144), (23 * GIB, 32768), (0, 4096))
# The automatic contexts, largest first: the VRAM tiers, which are also the steps
# nextLowerAutoNumCtx takes after an out-of-memory load.
AUTO_NUM_CTX_TIERS: tuple[int, ...] = tuple(ctx for _, ctx in VRAM_CONTEXT_TIERS)
AUTO_NUM_CTX_FLOOR = AUTO_NUM_CTX_TIERS[-1]


def vram_default_num_ctx(total_vram_bytes: int, gpu_overhead_bytes: int = 0, gpu_count: int = 1) -> int:
    """The num_ctx Ollama gives a request that sets none, on a backend with this much VRAM (summed
    over its GPUs; OLLAMA_GPU_OVERHEAD comes off each one)."""
    usable = max(0, total_vram_bytes - gpu_overhead_bytes * max(gpu_count, 0))
    return next(ctx for least, ctx in VRAM_CONTEXT_TIERS if usable >= least)


def next_lower_auto_num_ctx(num_ctx: int) -> int | None:
    """sched.go nextLowerAutoNumCtx: the context an automatic-context load retries at after running
    out of memory (>32768 -> 32768, >4096 -> 4096); None below that (no retry)."""
    if num_ctx > 32768:
        return 32768
    if num_ctx > 4096:
        return 4096
    return None
