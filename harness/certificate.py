"""Certificate: JSON first (the contract), Markdown rendered from it."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CERTIFICATE_VERSION = 1


def verdict_of(checks: list[dict[str, Any]]) -> str:
    statuses = {c["status"] for c in checks}
    if statuses & {"failed", "error"}:
        return "failed"
    if not checks or statuses != {"passed"}:
        return "incomplete"
    return "certified"


def build(model: str, spec_sha256: str, versions: dict[str, str], checks: list[dict[str, Any]],
          command: str = "", spec_path: str = "") -> dict[str, Any]:
    return {
        "certificate_version": CERTIFICATE_VERSION,
        "model": model,
        "spec_sha256": spec_sha256,
        "spec_path": spec_path,
        "verdict": verdict_of(checks),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "versions": versions,
        "checks": checks,
    }


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are meant to be published
    os.replace(tmp, path)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return ""
    return str(value)


def render_markdown(cert: dict[str, Any]) -> str:
    icon = {"passed": "✅ passed", "failed": "❌ failed", "error": "💥 error", "not_run": "⏭️ not run"}
    lines = [
        f"# {cert['model']}: **{cert['verdict']}**",
        "",
        f"spec sha256 `{cert['spec_sha256'][:16]}…` · {cert['created']}"
        + (f" · reproduce: `{cert['command']}`" if cert.get("command") else ""),
        "",
        "| check | status | metrics | tolerance | reason |",
        "|---|---|---|---|---|",
    ]
    for check in cert["checks"]:
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in check.get("metrics", {}).items() if _short(v))
        tolerance = ", ".join(f"{k}{'≥' if k.startswith('min_') else '≤'}{_short(v)}"
                              for k, v in check.get("tolerance", {}).items())
        reason = check.get("reason", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{check['id']}` | {icon.get(check['status'], check['status'])} | {metrics} | "
                     f"{tolerance} | {reason[:300]} |")
    counts: dict[str, int] = {}
    for check in cert["checks"]:
        counts[check["status"]] = counts.get(check["status"], 0) + 1
    lines += ["", " · ".join(f"{n} {s}" for s, n in sorted(counts.items())), "", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(cert["versions"].items())]
    return "\n".join(lines) + "\n"


def write(cert: dict[str, Any], report_dir: Path) -> Path:
    out = Path(report_dir) / cert["model"]
    _atomic_write(out / "certificate.json", json.dumps(cert, indent=2, sort_keys=False, default=str) + "\n")
    _atomic_write(out / "summary.md", render_markdown(cert))
    _write_html(cert, Path(report_dir))
    return out


def _write_html(cert: dict[str, Any], report_dir: Path) -> None:
    """<model>/index.html and the report folder's index.html; a rendering bug never costs the certificate."""
    try:
        from .report import write_pages

        write_pages(cert, report_dir)
    except Exception as exc:  # noqa: BLE001 - certificate.json (the contract) is already written
        print(f"harness: HTML report for {cert.get('model')!r} not written: {type(exc).__name__}: {exc}",
              file=sys.stderr)
