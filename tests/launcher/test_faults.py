"""Whose fault a failed reply is: retried elsewhere only when the backend failed."""

import pytest

from launcher.facts.faults import is_backend_fault, is_out_of_memory


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (502, "bad gateway"),
        (503, "server busy, please try again.  maximum pending requests exceeded"),
        (504, ""),
        (500, "llama runner process has terminated: exit status 2"),
        (500, "model requires more system memory (12.0 GiB) than is available (4.0 GiB)"),
        (500, "cudaMalloc failed: out of memory"),
        (500, "unable to allocate CUDA0 buffer: failed to allocate buffer"),
        (500, "something nobody has seen before"),
    ],
)
def test_backend_faults_are_retried(status: int, message: str) -> None:
    assert is_backend_fault(status, message)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (500, 'option "num_ctx" must be of type integer'),
        (500, "template: :1:12: executing \"\" at <.Foo>: can't evaluate field Foo"),
        (400, "registry.ollama.ai/library/llama3.1:8b does not support thinking"),
        (404, 'model "nope" not found, try pulling it first'),
        (400, "invalid JSON"),
        (413, "request body too large"),
    ],
)
def test_request_errors_are_passed_through(status: int, message: str) -> None:
    assert not is_backend_fault(status, message)


def test_out_of_memory_texts_match_ollamas_patterns() -> None:
    assert is_out_of_memory("alloc_buffer: allocating 9.1 GiB on device 0: cudaMalloc failed")
    assert is_out_of_memory("Insufficient Memory")
    assert not is_out_of_memory("unable to allocate CPU buffer")  # what the simulator used to say
