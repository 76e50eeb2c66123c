"""A verdict is a measurement judged against a tolerance; it becomes one certificate row.

Statuses: passed / failed / error are judged here; not_run means this machine lacks something (the reason
says what), not_applicable means the combination cannot exist by design (the backend says why). Neither
of the last two is ever a pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .tolerances import as_records

Status = Literal["passed", "failed", "not_run", "not_applicable", "error"]
STATUSES = ("passed", "failed", "error", "not_run", "not_applicable")


@dataclass
class Verdict:
    status: Status
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, Any] = field(default_factory=dict)
    localization: dict[str, Any] | None = None  # a failed parity check: where it first diverges

    def as_dict(self) -> dict[str, Any]:
        out = {"status": self.status, "reason": self.reason, "metrics": self.metrics,
               "tolerance": as_records(self.tolerance)}
        if self.localization is not None:
            out["localization"] = self.localization
        return out


def from_problems(problems: list[str], metrics: dict[str, Any], tolerance: dict[str, Any] | None = None,
                  what: str = "problems") -> Verdict:
    """Passed when there are no problems; otherwise failed with the first few named."""
    if not problems:
        return Verdict("passed", "", metrics, tolerance or {})
    shown = "; ".join(problems[:5])
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    return Verdict("failed", f"{len(problems)} {what}: {shown}{more}", metrics, tolerance or {})
