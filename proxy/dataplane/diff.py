"""Diffs without noise (Twitter's Diffy): a shadow's answer compared with the user's field by
field (the status, each header, each JSON path; other bodies by digest), and the fields that
differ between two answers of the *same* version (copies sent to the primary once more, the
mirror's ``baseline``) learnt as noise: a timestamp or a request id differs everywhere and
says nothing about the candidate.

Bounded: the first ``BODY_KEPT`` bytes of each body are compared, at most ``FIELDS_PER_ANSWER``
fields of each, ``FIELDS_KEPT`` distinct fields counted per shadow (later ones count as
``other``), and the mismatch rate is over the last ``RECENT`` comparisons.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from typing import Any

BODY_KEPT = 64 * 1024
FIELDS_PER_ANSWER = 500
FIELDS_KEPT = 200
LIST_ITEMS = 50          # of a JSON list, compared item by item; the rest by its length
RECENT = 1000
TOP_FIELDS = 10
# A field is noise when two answers of the primary differ there at least this share as often
# as the candidate's differs from the user's (and at least MIN_BASELINE primary pairs were
# compared): a timestamp differs in both nearly always.
NOISE_SHARE = 0.5
MIN_BASELINE = 10
# Never compared: they describe the connection or the framing, not the answer.
SKIPPED_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding",
                             b"content-length", b"x-weir-version", b"via"})
OTHER = "other"


class Captured:
    """One answer as a comparison needs it: its headers, the digest of its body, and the
    body's first BODY_KEPT bytes. Fed while the answer streams by."""

    __slots__ = ("body", "digest", "headers", "size")

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0

    def take_head(self, lines: list[bytes]) -> None:
        """The headers of a head as ResponseSink.on_upstream_head gets them (lines[0] for the
        status line, then name, b": ", value, CRLF for each): read now, since the sink that
        relays the head may add to that list."""
        self.headers = [(lines[i], lines[i + 2]) for i in range(1, len(lines) - 2, 4)]

    def update(self, data: bytes) -> None:
        self.digest.update(data)
        if self.size < BODY_KEPT:
            self.body.append(data[:BODY_KEPT - self.size])
        self.size += len(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


_INDEX = re.compile(r"\[\d+\]")


def pattern_of(field: str) -> str:
    """A field with its list indexes dropped: what an ignore entry names."""
    return _INDEX.sub("[]", field)


def normalize_json_path(path: str) -> str:
    """``$.items[*].id``, ``items[].id`` or ``items.id`` style entries as field patterns."""
    text = path.strip()
    text = text[1:] if text.startswith("$") else text
    text = text.lstrip(".").replace("[*]", "[]")
    return "body." + text if text else "body"


class Differ:
    """What to compare, from the mirror's ``ignore``."""

    def __init__(self, ignore_headers: list[str], ignore_json_paths: list[str]) -> None:
        self.ignore_headers = frozenset(h.lower().encode() for h in ignore_headers)
        self.ignore_paths = tuple(normalize_json_path(p) for p in ignore_json_paths)

    def ignored(self, field: str) -> bool:
        pattern = pattern_of(field)
        return any(pattern == p or pattern.startswith(p + ".") or pattern.startswith(p + "[")
                   for p in self.ignore_paths)

    def fields(self, status: int, answer: Captured) -> dict[str, str]:
        found: dict[str, str] = {"status": str(status)}
        for name, value in answer.headers:
            key = name.strip().lower()
            if key in SKIPPED_HEADERS or key in self.ignore_headers:
                continue
            field = "header." + key.decode("latin-1")
            text = value.strip().decode("latin-1")
            found[field] = found[field] + ", " + text if field in found else text
        body = b"".join(answer.body)
        document: Any = None
        if answer.size <= BODY_KEPT and body.lstrip()[:1] in (b"{", b"["):
            try:
                document = json.loads(body)
            except ValueError:
                document = None
        if document is None:
            found["body"] = answer.hexdigest() if answer.size else ""
        else:
            flatten(document, "body", found)
        if self.ignore_paths:
            found = {k: v for k, v in found.items() if not self.ignored(k)}
        return found

    def differences(self, primary_status: int, primary: Captured, status: int,
                    answer: Captured) -> tuple[set[str], dict[str, str], dict[str, str]]:
        mine, theirs = self.fields(primary_status, primary), self.fields(status, answer)
        differ = {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
        return differ, mine, theirs


def flatten(value: Any, path: str, out: dict[str, str]) -> None:
    """Leaves of a JSON document as path → its JSON text (lists item by item, up to
    LIST_ITEMS, and their length)."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack and len(out) < FIELDS_PER_ANSWER:
        item, where = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in reversed(list(item.items())))
        elif isinstance(item, list):
            out[where + ".length"] = str(len(item))
            stack.extend((v, f"{where}[{i}]") for i, v in
                         reversed(list(enumerate(item[:LIST_ITEMS]))))
        else:
            out[where] = json.dumps(item)


class DiffStats:
    """Per shadow: how often each field differs from the user's answer, how often it differs
    between two answers of the primary (noise), one example each, and the recent
    comparisons' differing fields (for the mismatch rate after noise)."""

    def __init__(self) -> None:
        self.compared = 0
        self.baseline_compared = 0
        self.differing: dict[str, int] = {}
        self.noise: dict[str, int] = {}
        self.examples: dict[str, dict[str, str]] = {}
        self.recent: deque[frozenset[str]] = deque(maxlen=RECENT)

    def record(self, differ: set[str], baseline: bool, request: str, mine: dict[str, str],
               theirs: dict[str, str]) -> None:
        counts = self.noise if baseline else self.differing
        if baseline:
            self.baseline_compared += 1
        else:
            self.compared += 1
        kept = set()
        # Counted once per comparison by pattern: items of one list count as one field.
        for key, field in {pattern_of(f): f for f in sorted(differ)}.items():
            if key not in counts and len(counts) >= FIELDS_KEPT:
                key = OTHER
            counts[key] = counts.get(key, 0) + 1
            kept.add(key)
            if not baseline and key not in self.examples and key != OTHER:
                self.examples[key] = {"request": request[:200],
                                      "primary": mine.get(field, "(absent)")[:200],
                                      "shadow": theirs.get(field, "(absent)")[:200]}
        if not baseline:
            self.recent.append(frozenset(kept))

    def merge(self, compared: int, baseline_compared: int, differing: dict[str, int],
              noise: dict[str, int], recent: list[frozenset[str]],
              examples: dict[str, dict[str, str]]) -> None:
        """A worker's gains (runtime/report.py), into the supervisor's."""
        self.compared += compared
        self.baseline_compared += baseline_compared
        for counts, gains in ((self.differing, differing), (self.noise, noise)):
            for field, count in gains.items():
                counts[field] = counts.get(field, 0) + count
        self.recent.extend(recent)
        for field, example in examples.items():
            self.examples.setdefault(field, example)

    def noise_rate(self, field: str) -> float:
        return (self.noise.get(field, 0) / self.baseline_compared
                if self.baseline_compared else 0.0)

    def is_noise(self, field: str) -> bool:
        if self.baseline_compared < MIN_BASELINE or not self.compared:
            return False
        rate = self.differing.get(field, 0) / self.compared
        noise = self.noise_rate(field)
        return noise > 0 and noise >= NOISE_SHARE * rate

    def noise_fields(self) -> set[str]:
        return {f for f in self.differing if self.is_noise(f)}

    def mismatches_since(self, compared: int) -> tuple[int, int]:
        """Of the comparisons after the ``compared``-th (the last RECENT at most): how many
        differ in a field that is not noise, and how many there were."""
        count = min(self.compared - compared, len(self.recent))
        if count <= 0:
            return 0, 0
        noise = self.noise_fields()
        recent = list(self.recent)[-count:]
        return sum(1 for fields in recent if fields - noise), count

    def report(self) -> dict[str, Any]:
        """For /api/status: the mismatch rate after noise over the recent comparisons, and
        the fields that differ most (noise included, marked), each with an example."""
        noise = self.noise_fields()
        recent = self.recent
        mismatched = sum(1 for fields in recent if fields - noise)
        fields = sorted(self.differing.items(), key=lambda item: -item[1])[:TOP_FIELDS * 2]
        shown = [{"field": field, "rate": round(count / self.compared, 4),
                  "noise_rate": round(self.noise_rate(field), 4), "noise": field in noise,
                  "example": self.examples.get(field)}
                 for field, count in fields]
        real = [f for f in shown if not f["noise"]][:TOP_FIELDS]
        return {"compared": self.compared, "baseline_compared": self.baseline_compared,
                "mismatch_rate": round(mismatched / len(recent), 4) if recent else None,
                "fields": real, "noise": [f for f in shown if f["noise"]][:TOP_FIELDS]}
