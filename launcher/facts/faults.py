"""Whose fault is a failed Ollama reply: the backend's (retry elsewhere) or the request's (pass it on).

The gateway retries a request on another backend only when the backend failed; `corral batch` retries
an item only then. Retrying a request's own error is wasted work on every backend and hides the
message from the client, so the rule is written once, here, from Ollama's own texts:

- connection errors, resets and 502/503/504 are the backend's (503 is also Ollama's "server busy"
  when its queue is full, `server/sched.go` ErrMaxQueue);
- a 500 is the backend's when the runner crashed, hung or ran out of memory (`llm/status.go`
  `outOfMemorySubstrings`, the runner's exit messages in `llm/server.go`), and the request's when it
  is about the request: bad option types (`api/types.go` FromMap), template and input errors;
- a 500 that says neither is treated as the backend's: a retry of an unknown failure on a healthy
  backend costs one attempt, while passing on a crash that another backend would have served loses
  the request;
- every 4xx is the request's.
"""

from __future__ import annotations

# Ollama's llm/status.go outOfMemorySubstrings (matched lower-cased, as IsOutOfMemoryMessage does).
OUT_OF_MEMORY_SUBSTRINGS: tuple[str, ...] = (
    "out of memory",
    "out of device memory",
    "cudamalloc failed",
    "hipmalloc failed",
    "failed to allocate",
    "allocation failed",
    "not enough memory",
    "insufficient memory",
    "vk_error_out_of_device_memory",
    "erroroutofmemory",
)

# A runner that died or never came up (llm/server.go, runner/): the next backend may well succeed.
_RUNNER_FAULT_SUBSTRINGS: tuple[str, ...] = (
    "llama runner process has terminated",
    "model runner has unexpectedly stopped",
    "runner process no longer running",
    "timed out waiting for llama runner",
    "error loading model",
    "panic:",
    "fatal error:",
    "signal arrived during cgo execution",
    "cuda error",
    "rocm error",
    "ggml_assert",
    "connection refused",
    "connection reset",
    "broken pipe",
    "unexpected eof",
    "server busy",
)

# Texts that are about the request itself; the same request fails the same way everywhere.
_REQUEST_ERROR_SUBSTRINGS: tuple[str, ...] = (
    "must be of type",  # api/types.go: option "num_ctx" must be of type integer
    "invalid option",
    "unknown option",
    "template:",  # text/template parse and execute errors
    "invalid input",
    "invalid format",
    "invalid json",
    "cannot unmarshal",
    "does not support",  # "registry.ollama.ai/library/x does not support tools|thinking|insert"
    "is required",
    "input length exceeds",
    "exceeds maximum context length",
    "invalid image",
    "failed to process inputs",
)


def is_out_of_memory(message: str) -> bool:
    """True when Ollama would call this text an out-of-memory failure (`llm.IsOutOfMemoryMessage`)."""
    text = message.lower()
    return any(needle in text for needle in OUT_OF_MEMORY_SUBSTRINGS)


def is_backend_fault(status: int, message: str) -> bool:
    """True when a reply with this status and error text is the backend's fault, so the request may
    be sent again elsewhere. `message` is the reply's error text (`{"error": ...}` or the body)."""
    if status in (502, 503, 504):
        return True
    if status != 500:
        return False
    text = message.lower()
    if is_out_of_memory(text) or any(needle in text for needle in _RUNNER_FAULT_SUBSTRINGS):
        return True
    return not any(needle in text for needle in _REQUEST_ERROR_SUBSTRINGS)
