"""Who changed what through the admin API: the last actions per service, and the ones that
concern the whole instance (reloads, drains). The control plane owns the one ``ActionLog``
and shows it in /api/status.

Kept in memory, per instance. A rollout action is recorded for good in the rollout record
(its events name who acted and are saved with the runtime state); every action is also in
the log, which is the durable trail. Saving these lists with the runtime state would add
to every change's save (one that sends traffic somewhere new is saved before it counts),
and, with a shared store, make changes through two instances to different services conflict
over the one list where they do not today.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

# Actions kept per service, and for the instance: enough to answer "who moved this, and
# what came before" during an incident, bounded whatever a script does.
ACTIONS_KEPT = 20


class ActionLog:
    def __init__(self, kept: int = ACTIONS_KEPT) -> None:
        self.kept = kept
        self._services: dict[str, deque[dict[str, Any]]] = {}
        self._instance: deque[dict[str, Any]] = deque(maxlen=kept)

    def record(self, by: str, action: str, detail: str,
               service: str | None = None) -> dict[str, Any]:
        """One action, made by the token named ``by``; ``service`` None: the instance's.
        Services are named as the config names them (the control plane looks each up before
        it acts), so the lists stay as few as the services."""
        entry = {"at": time.time(), "by": by, "action": action, "detail": detail}
        if service is None:
            self._instance.append(entry)
        else:
            self._services.setdefault(service, deque(maxlen=self.kept)).append(entry)
        return entry

    def for_service(self, service: str) -> list[dict[str, Any]]:
        """Oldest first, as the rollout's events are."""
        return [dict(entry) for entry in self._services.get(service, ())]

    def for_instance(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self._instance]

