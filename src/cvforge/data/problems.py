"""Counting what is wrong with a data set, without losing anything.

Readers never stop at the first bad box: they fix what has one obvious fix (clip a box to the image),
drop what cannot be used (a box of zero size, NaN coordinates, an unknown class) and record each
case here with the file and line. ``cvforge data check`` prints the report; training prints a
one-line summary and goes on. Problems whose severity is ``error`` make ``data check`` exit 1.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

# kind -> (severity, what was done about it)
KINDS: dict[str, tuple[str, str]] = {
    "unreadable image": ("error", "sample skipped by data check; training refuses it"),
    "missing image": ("error", "sample skipped"),
    "box partly outside image": ("warning", "clipped to the image"),
    "box of zero or negative size": ("warning", "dropped"),
    "non-finite box coordinates": ("error", "dropped"),
    "unknown class id": ("error", "dropped"),
    "duplicate image id": ("error", "later duplicate skipped"),
    "duplicate annotation id": ("error", "later duplicate skipped"),
    "annotation for unknown image": ("error", "dropped"),
    "path escapes data root": ("error", "sample skipped"),
    "malformed label line": ("error", "line skipped"),
    "image without label file": ("info", "treated as a background image"),
    "instance without segmentation": ("warning", "its box is used as its mask"),
    "mask value out of range": ("error", "pixels set to ignore (255)"),
    "image and mask differ in size": ("error", "sample skipped"),
    "mask missing": ("error", "sample skipped"),
}


@dataclass
class Problems:
    """Per kind, how many times it happened and the first few places (``file:line``)."""

    keep: int = 5
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    places: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, where: str, count: int = 1) -> None:
        assert kind in KINDS, f"unregistered problem kind {kind!r}"
        self.counts[kind] += count
        if len(self.places[kind]) < self.keep:
            self.places[kind].append(where)

    def __bool__(self) -> bool:
        return any(self.counts.values())

    def severity(self, kind: str) -> str:
        return KINDS[kind][0]

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.counts.items() if self.severity(k) == "error")

    def merge(self, other: "Problems") -> None:
        for kind, n in other.counts.items():
            self.counts[kind] += n
            self.places[kind].extend(other.places[kind][: max(0, self.keep - len(self.places[kind]))])

    def summary(self) -> str:
        """One line, e.g. ``3 box partly outside image (clipped to the image), 1 unknown class id (dropped)``."""
        return ", ".join(f"{n} {k} ({KINDS[k][1]})" for k, n in sorted(self.counts.items()) if n)

    def report(self) -> str:
        """Multi-line report: one block per kind with its severity and first places."""
        lines = []
        for kind, n in sorted(self.counts.items(), key=lambda kv: (KINDS[kv[0]][0] != "error", kv[0])):
            if not n:
                continue
            severity, action = KINDS[kind]
            lines.append(f"{severity:7s} {n:6d}  {kind} — {action}")
            lines += [f"                 {place}" for place in self.places[kind]]
        return "\n".join(lines)
