"""Messages between the supervisor and its workers (`weir run --workers N`).

One Unix socketpair per worker, carrying frames of a 4-byte length and a pickled
``(kind, body)``. Pickle because both ends are this same program, started by the supervisor,
on a private socketpair: nothing else can write to it, and the config travels as the
validated ``Config`` object itself, so a worker compiles exactly the table the supervisor did.

Supervisor → worker: ``config`` (the config, runtime overrides, generation, listen address,
health flags and drained upstreams), ``health`` (changed active-check flags), ``drained`` (the
upstream addresses an operator drained, whole, when they change), ``drain`` (shut down).
Worker → supervisor: ``ready`` (listening), ``report`` (counter deltas and gauges, and the
drained addresses it applies).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024  # a corrupt length must not make us allocate gigabytes

CONFIG = "config"
HEALTH = "health"
DRAINED = "drained"
DRAIN = "drain"
READY = "ready"
REPORT = "report"


def encode(kind: str, body: Any) -> bytes:
    data = pickle.dumps((kind, body), protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


async def receive(reader: asyncio.StreamReader) -> tuple[str, Any] | None:
    """The next message, or None once the other end is gone."""
    try:
        (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        if size > MAX_FRAME:
            raise ValueError(f"message of {size} bytes")
        kind, body = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return str(kind), body


def send(writer: asyncio.StreamWriter, kind: str, body: Any) -> None:
    """Queue a message; the transport writes it out as the peer reads (no await needed, and
    messages are small and few)."""
    if not writer.is_closing():
        writer.write(encode(kind, body))
