"""Upstream time bounds that fit LLM traffic: connect, first byte, and silence between chunks.

A fixed read timeout does not fit: a first token may honestly wait for a 40 GB load, while a
token stream that goes quiet for two minutes is a hung backend. So:

- connect: `connect_timeout_s`;
- first byte: what the router expects for this request on this backend (load + queue + prefill,
  `Send.expected_ttft_s`; for a non-streamed request also the decode of its `num_predict`, else a
  typical answer length, at the rate observed there), times `first_byte_timeout_factor`, never
  under `first_byte_timeout_floor_s`. Past it the backend is taken for hung: the attempt fails
  (nothing reached the client yet) and the request is retried elsewhere;
- between chunks after the first: `stream_idle_timeout_s`; past it the stream ends with an error
  line (a byte already reached the client, so no retry).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import GatewaySettings
from gateway.routing.snapshot import ObservedStats

# The decode length of a non-streamed answer without num_predict (cost.CostSettings.output_tokens).
TYPICAL_ANSWER_TOKENS = 256


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float


def answer_decode_s(observed: ObservedStats | None, num_predict: int) -> float:
    """Expected decode time of a whole answer at the rate observed on its backend; 0 when no rate
    was observed."""
    if observed is None or observed.tokens_per_s <= 0:
        return 0.0
    tokens = num_predict if num_predict > 0 else TYPICAL_ANSWER_TOKENS
    return tokens / observed.tokens_per_s


def upstream_timeouts(settings: GatewaySettings, expected_s: float) -> UpstreamTimeouts:
    """The bounds for one attempt whose first byte the router expects after `expected_s`."""
    first_byte_s = max(settings.first_byte_timeout_floor_s, settings.first_byte_timeout_factor * max(expected_s, 0.0))
    return UpstreamTimeouts(settings.connect_timeout_s, first_byte_s, settings.stream_idle_timeout_s)
