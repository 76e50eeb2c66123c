"""A verdict is a measurement judged against a tolerance; it becomes one certificate row."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["passed", "failed", "not_run", "error"]


@dataclass
class Verdict:
    status: Status
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_problems(problems: list[str], metrics: dict[str, Any], tolerance: dict[str, Any] | None = None,
                  what: str = "problems") -> Verdict:
    """Passed when there are no problems; otherwise failed with the first few named."""
    if not problems:
        return Verdict("passed", "", metrics, tolerance or {})
    shown = "; ".join(problems[:5])
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    return Verdict("failed", f"{len(problems)} {what}: {shown}{more}", metrics, tolerance or {})
