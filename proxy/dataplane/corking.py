"""Data-plane writes held until the end of the event loop's iteration, then made together.

Every write a proxy makes wakes whoever reads it: a client or an upstream. Made one at a time
as each request is handled, those writes are spread out, so the reader has often gone back to
sleep before the next one, and waking a sleeping CPU costs the writer (on a VM, an
inter-processor interrupt). Held until the loop has handled everything that was ready, the
iteration's writes go out back to back; a response's head and body also leave as one
write(2) of one buffer. bench/RESULTS.md has the numbers.

A held transport keeps its own order: every write goes through the hold, and whatever else
ends the stream (close, abort, write_eof) first sends what is held. So must anything that
lets the transport close itself: a protocol's eof_received that returns None calls
``uncork`` first. What is held for a transport the peer has already closed is dropped, as
the write itself would have been.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("weir.corking")

# Held pieces up to this many bytes in all are joined into one write; more go out as a
# writev, with only the pieces under this size joined.
JOIN_BYTES: Final = 16 * 1024


def coalesced(pieces: list[bytes]) -> list[bytes]:
    """Large pieces as they are (a body is not copied to join it), the runs of small ones
    between them (a response head's lines, chunk sizes) each joined into one."""
    out: list[bytes] = []
    run: list[bytes] = []
    for piece in pieces:
        if len(piece) >= JOIN_BYTES:
            if run:
                out.append(b"".join(run))
                run = []
            out.append(piece)
        else:
            run.append(piece)
    if run:
        out.append(b"".join(run))
    return out


class Corker:
    """One per event loop: the transports holding writes, sent once per loop iteration, and
    the loop's time, read once per iteration."""

    __slots__ = ("context", "held", "loop", "scheduled", "time", "time_read", "timestamp")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.held: list[CorkedTransport] = []
        self.scheduled = False
        # The flush reads no context variables: an empty context of its own spares call_soon
        # a copy of the current one on every loop iteration.
        self.context = contextvars.Context()
        self.time: Callable[[], float] = loop.time
        self.time_read = False
        self.timestamp = 0.0

    def now(self) -> float:
        """``loop.time()`` as it was when first asked in this loop iteration.

        Like nginx's time cache, updated once per pass of its event loop: the data plane
        stamps every request several times (deadlines, upstream activity, pool idle times),
        and reading the clock costs more than the rest of the call. The value is forgotten by
        the flush, which runs before the loop next waits for I/O, so it is never older than
        the handling of one iteration's events: what timeouts of a second or more can
        ignore."""
        if self.time_read:
            return self.timestamp
        self.timestamp = stamp = self.time()
        self.time_read = True
        self.flush_soon()  # which forgets it
        return stamp

    def hold(self, transport: CorkedTransport) -> None:
        self.held.append(transport)
        self.flush_soon()

    def flush_soon(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            # Ready callbacks run once the iteration's I/O callbacks have all run.
            self.loop.call_soon(self.flush, context=self.context)

    def flush(self) -> None:
        self.scheduled = False
        self.time_read = False
        held, self.held = self.held, []
        for transport in held:
            try:
                transport.uncork()
            except Exception:  # one broken transport must not keep the others' writes
                log.exception("sending held writes failed")


# What a transport holds when it holds nothing: one empty list for all of them, replaced (never
# added to) by the first write, which spares a list per send and per idle connection.
NOTHING_HELD: Final[list[bytes]] = []


class CorkedTransport:
    """The part of an asyncio transport the data plane uses, with its writes held."""

    __slots__ = ("closing", "corker", "pending", "send", "transport")

    def __init__(self, transport: asyncio.BaseTransport, corker: Corker) -> None:
        raw: Any = transport  # uvloop's transports are not asyncio subclasses
        self.transport = raw
        self.corker = corker
        self.pending: list[bytes] = NOTHING_HELD
        # The transport's write, taken off its class and called with it: from compiled code,
        # cheaper than a call by name, and a bound method would be one more object to hold.
        self.send: Callable[[Any, bytes], object] = type(raw).write
        self.closing: Callable[[Any], bool] = type(raw).is_closing  # asked once per request

    def write(self, data: bytes) -> None:
        if not data:
            return
        pending = self.pending
        if pending:
            pending.append(data)
        else:
            self.corker.hold(self)
            self.pending = [data]

    def writelines(self, pieces: list[bytes] | tuple[bytes, ...]) -> None:
        self.write_list(list(pieces))  # an empty piece costs nothing: the join skips it

    def write_list(self, pieces: list[bytes]) -> None:
        """``writelines`` for a list the caller gives up: held as it is when nothing else is
        (a response's head and body, gathered in one list), rather than copied."""
        pending = self.pending
        if pending:
            pending.extend(pieces)
        elif pieces:
            self.corker.hold(self)
            self.pending = pieces

    def uncork(self) -> None:
        pending = self.pending
        if not pending:
            return
        self.pending = NOTHING_HELD
        transport = self.transport
        try:
            if len(pending) == 1:
                self.send(transport, pending[0])
                return
            size = 0
            for piece in pending:
                size += len(piece)
            if size <= JOIN_BYTES:
                self.send(transport, b"".join(pending))  # one write(2) of one buffer
            else:
                transport.writelines(coalesced(pending))
        except RuntimeError:
            # Closed since (the peer went away, or a fatal error): nobody left to send it to.
            # Checking is_closing() first would cost a call on every uncork.
            pass

    def close(self) -> None:
        self.uncork()
        self.transport.close()

    def abort(self) -> None:
        # What was written before still goes out first, as it would have without the hold:
        # the kernel takes it at once, and the reset follows it.
        self.uncork()
        self.transport.abort()

    def write_eof(self) -> None:
        self.uncork()
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        return bool(self.transport.can_write_eof())

    def is_closing(self) -> bool:
        return bool(self.closing(self.transport))

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)
