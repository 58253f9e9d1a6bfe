"""The optional structured access log: one JSON object per line, per request.

Lines are written to a buffered file and flushed once a second (and at shutdown), so a busy
proxy does not pay a write syscall per request.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from .exchange import Exchange
    from .routing import VersionTarget


class AccessLog:
    def __init__(self, destination: str) -> None:
        self.destination = destination
        self.stream: IO[str] = (sys.stdout if destination == "-"
                                else open(destination, "a", encoding="utf-8",  # noqa: SIM115
                                          buffering=1 << 16))

    def exchange(self, ex: Exchange, status: int, seconds: float) -> None:
        target = ex.target
        entry = {
            "time": round(time.time(), 3),
            "client": ex.peer.address,
            "method": ex.method.decode(),
            "protocol": ex.protocol(),
            "host": ex.hmap.get(b"host", b"").decode("latin-1"),
            "path": ex.url.decode("latin-1"),
            "service": target.service if target is not None else None,
            "version": target.name if target is not None else None,
            "reason": ex.reason or None,
            "upstream": ex.upstream_address,
            "status": status,
            "bytes_in": ex.body_received,
            "bytes_out": ex.bytes_out,
            "duration_ms": round(seconds * 1000, 3),
        }
        if ex.grpc_status >= 0:
            entry["grpc_status"] = ex.grpc_status
        self.stream.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def mirror(self, target: VersionTarget, shadow_status: int, outcome: str, path: bytes,
               method: bytes) -> None:
        entry = {
            "time": round(time.time(), 3),
            "method": method.decode(),
            "path": path.decode("latin-1"),
            "service": target.service,
            "version": target.name,
            "reason": "mirror",
            "status": shadow_status or None,
            "outcome": outcome,
        }
        self.stream.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.flush()
        if self.stream is not sys.stdout:
            self.stream.close()
