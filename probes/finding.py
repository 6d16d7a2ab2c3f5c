"""The Finding: what one probe reports. It lives beside the probes, so probes/ runs without the rest of
qwendoctor; the doctor, the report and tune's search space read the same class."""

from __future__ import annotations

import dataclasses
from typing import Any

STATUSES = ("ok", "warn", "fail", "skip", "crash")
# Statuses that make `qwendoctor check` exit 1.
FAILING_STATUSES = frozenset({"fail", "crash"})


@dataclasses.dataclass
class Finding:
    id: str
    status: str
    summary: str
    details: list[str] = dataclasses.field(default_factory=list)
    fix: str | None = None
    # Numbers and facts other code reads (tune reads attention_backends' "working" list).
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)
    elapsed_s: float | None = None  # set by the runner, never by the probe

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Finding":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
