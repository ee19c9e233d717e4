"""Reading a model call's body safely: size first, slow senders bounded, encodings decoded, JSON strict.

- An announced `Content-Length` over `max_body_bytes` is refused (413) before a byte is read, and
  the connection is closed after the reply instead of draining a body nobody wants.
- Each read must arrive within `body_read_timeout_s` of the previous one (nginx's
  client_body_timeout): a client that stops sending mid-body gets 408 instead of holding a handler.
- Compressed bodies are forwarded decoded, without their Content-Encoding: Ollama reads bodies as
  plain JSON. aiohttp's server already inflates a single `gzip` or `deflate` (and `br`/`zstd` with
  their packages) while reading, which is why such a body used to reach the backends decoded but
  still labelled gzip (500 x 3); its decoding errors are the client's (400). What aiohttp leaves
  alone (`x-gzip`, a list such as `gzip, identity`) is inflated here, bounded by the same size limit
  so a small bomb cannot expand into memory; an encoding nobody can decode is refused (415).
- The JSON itself is parsed strictly by gateway/api/strictjson.py (via parse.parse_body).
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestPayloadError

from gateway.api.parse import BadRequest

# Set on a request whose body was decoded here: the proxy then drops its Content-Encoding.
BODY_DECODED = web.RequestKey("corral_body_decoded", bool)

# Content-Encodings aiohttp's server inflates itself while the body is read.
AIOHTTP_INFLATES: frozenset[str] = frozenset({"gzip", "deflate", "br", "zstd"})
# wbits for zlib.decompressobj: gzip framing, and zlib framing (HTTP's "deflate").
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def too_large(limit: int) -> BadRequest:
    return BadRequest(413, f"request body too large: the limit is {limit} bytes")


def announced_too_large(request: web.BaseRequest, limit: int) -> bool:
    """Whether the request's Content-Length already says its body is over `limit`."""
    length = request.content_length
    return length is not None and length > limit


async def read_raw(request: web.Request, limit: int, read_timeout_s: float) -> bytes:
    """The body as sent, at most `limit` bytes. Raises BadRequest: 413 (over the limit), 408 (a read
    waited longer than `read_timeout_s`)."""
    if announced_too_large(request, limit):
        raise too_large(limit)
    body = bytearray()
    content = request.content
    while True:
        try:
            if content.is_eof():  # the rest is already here (a small body usually is): no timer
                chunk = content.read_nowait()
                if not body:  # all of it, in one piece
                    if len(chunk) > limit:
                        raise too_large(limit)
                    return chunk
            else:
                async with asyncio.timeout(read_timeout_s):
                    chunk = await content.readany()
        except TimeoutError:
            raise BadRequest(408, f"request body not received within {read_timeout_s:g}s") from None
        except (RequestPayloadError, ContentEncodingError):  # aiohttp could not inflate it
            encoding = request.headers.get("Content-Encoding", "").strip().lower()
            raise BadRequest(400, f"invalid {encoding or 'chunked'} request body: it does not decode") from None
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise too_large(limit)


def decode_content(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded from its Content-Encoding (a comma list, applied in order, undone in reverse).
    Raises BadRequest: 400 malformed, 413 decoded over `limit`, 415 unknown encoding."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        wbits = _WBITS.get(coding)
        if wbits is None:
            raise BadRequest(415, f"unsupported Content-Encoding {coding!r}: send gzip, deflate or identity")
        body = _inflate(body, wbits, coding, limit)
    return body


def _inflate(body: bytes, wbits: int, coding: str, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, limit + 1)
        if len(out) > limit or decoder.unconsumed_tail:
            raise too_large(limit)
        out += decoder.flush()
    except zlib.error as e:
        raise BadRequest(400, f"invalid {coding} request body: {e}") from None
    if not decoder.eof:
        raise BadRequest(400, f"invalid {coding} request body: truncated")
    if len(out) > limit:
        raise too_large(limit)
    return out


async def read_body(request: web.Request, limit: int, read_timeout_s: float) -> bytes:
    """The body to parse and forward: read (bounded) and decoded. Marks the request BODY_DECODED
    when it had a Content-Encoding, so the proxy forwards the plain bytes without that header."""
    encoding = request.headers.get("Content-Encoding", "").strip()
    if encoding and not _inflated_by_aiohttp(encoding):
        _check_codings(encoding)  # 415 before reading what cannot be decoded
    body = await read_raw(request, limit, read_timeout_s)
    if encoding:
        if not _inflated_by_aiohttp(encoding):
            body = decode_content(body, encoding, limit)
        request[BODY_DECODED] = True
    return body


def _inflated_by_aiohttp(encoding: str) -> bool:
    # http_parser.HttpRequestParser: one of these, exactly (ASCII, any case), is decoded as it is read.
    return encoding.isascii() and encoding.lower() in AIOHTTP_INFLATES


def _check_codings(encoding: str) -> None:
    for coding in (c.strip().lower() for c in encoding.split(",")):
        if coding and coding != "identity" and coding not in _WBITS:
            raise BadRequest(415, f"unsupported Content-Encoding {coding!r}: send gzip, deflate or identity")
