"""Where the runtime state lives: the interface the control plane persists through, the file
store (the default: one JSON file, as ``RuntimeState`` reads and writes it), and the factory
that picks a store from the config.

A store also answers whether this instance may run the rollout controller: always with the
file (one instance owns its file), by holding a lock with Redis (see redisstore.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..config.model import Config
from .state import RuntimeState, VersionOverride, WeightOverride

# How long a stopping process waits for its store to close (the Redis store: its last
# writes, releasing the controller lock, its connections) before it stops without it.
STORE_CLOSE_SECONDS = 5.0

# What a shared store hands over when another instance changed the state: the weights
# overrides, the rollout records, the drained upstreams (address → when) and the versions'
# overrides (service → version → override), whole (the control plane adopts them), and the
# services whose rollout record is what changed.
RemoteState = tuple[dict[str, WeightOverride], dict[str, dict[str, Any]], dict[str, float],
                    dict[str, dict[str, VersionOverride]]]
OnChange = Callable[[RemoteState, set[str]], Awaitable[None]]


class StoreError(OSError):
    """The store could not be read or written (an OSError, as a failed file write is)."""


class StoreConflict(StoreError):
    """Another instance changed the same field since this one last read it: nothing was
    written, and the store is re-reading it."""


class StoreUnavailable(StoreError):
    """The store could not be reached at start: Weir does not start without its state."""


class StateStore:
    """The interface, and the file store that implements it."""

    # Whether the store can be reached now; a file always can (a failed write is reported as
    # such). The Redis store keeps its own.
    connected = True

    kind = "file"

    def __init__(self, path: Path | None) -> None:
        self.path = path

    async def open(self) -> None:
        """Connect and read the state (before the control plane is built)."""

    def load_into(self, state: RuntimeState) -> None:
        """Fill ``state`` with what was read at start."""
        state.load()

    async def save(self, state: RuntimeState) -> None:
        await asyncio.to_thread(state.write, state.document())

    def start(self, state: RuntimeState, on_change: OnChange, lock: asyncio.Lock) -> None:
        """Begin following changes made elsewhere (nothing to follow for a private file).
        ``on_change`` is called with ``lock`` (the control plane's state lock) held."""

    async def refresh(self) -> None:
        """Read the state again now and hand it to ``on_change`` if it changed."""

    @property
    def leading(self) -> bool:
        """Whether this instance runs the rollout controller now."""
        return True

    async def close(self) -> None:
        """Release what the store holds (the controller lock) and disconnect."""

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "path": str(self.path) if self.path else None,
                "leader": True}


def make_store(config: Config) -> StateStore:
    path = Path(config.state_file) if config.state_file else None
    if config.state_store.type == "redis":
        from .redisstore import RedisStore

        return RedisStore(config.state_store, seed_file=path)
    return StateStore(path)
