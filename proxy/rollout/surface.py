"""What the rollout controller needs of the control plane, declared on the controller's side:
the control plane (control/plane.py) provides it, and the controller never imports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config.model import Config, Mirror, Service
    from ..dataplane.proxyserver import ProxyServer

# What puts a change to the runtime state back, should its save fail.
Undo = Callable[[], None]
# A change to the runtime state, made in memory: returns what undoes it (see commit), or None
# when it had nothing to change.
Prepare = Callable[[], Undo | None]


class RuntimeStateView(Protocol):
    """The runtime state the control plane persists: the controller keeps its records there."""

    rollouts: dict[str, dict[str, Any]]
    weights: dict[str, Any]   # per service: the weights override in force, if any

    def set_weights(self, config: Config, service: str, weights: dict[str, int],
                    source: str = ...) -> None: ...


class StoreView(Protocol):
    @property
    def leading(self) -> bool: ...

    async def refresh(self) -> None: ...


class ControlSurface(Protocol):
    config: Config
    previews: dict[str, tuple[str, str]]

    @property
    def state(self) -> RuntimeStateView: ...

    @property
    def store(self) -> StoreView: ...

    @property
    def proxy(self) -> ProxyServer: ...

    def service(self, name: str) -> Service: ...

    def apply(self) -> None: ...

    def set_rollout_mirror(self, service: str, mirror: Mirror | None) -> None: ...

    def changed(self) -> None: ...

    async def commit(self, change: Callable[[], Undo]) -> None:
        """Make ``change`` (under the state lock), save the state, then apply it to the data
        plane; if the save fails, undo it and raise StateWriteError (nothing changed)."""
        ...

    async def set_weights(self, name: str, weights: dict[str, int], source: str = ...,
                          fail_safe: bool = ...) -> dict[str, int]: ...

    async def stop_saving(self) -> None: ...
