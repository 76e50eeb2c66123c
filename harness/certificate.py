"""Certificate: JSON first (the contract), Markdown rendered from it."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CERTIFICATE_VERSION = 2
SCOPES = ("cpu", "gpu")
SIGNING_KEY_ENV = "CERTIFY_SIGNING_KEY"  # a CI secret: with it the integrity seal is an HMAC no hand edit can redo


def verdict_of(checks: list[dict[str, Any]]) -> str:
    """failed on any failed/error; certified when every check passed or cannot exist by design; else incomplete."""
    statuses = {c["status"] for c in checks}
    if statuses & {"failed", "error"}:
        return "failed"
    if "passed" not in statuses or statuses - {"passed", "not_applicable"}:
        return "incomplete"
    return "certified"


def scope_verdicts(checks: list[dict[str, Any]]) -> dict[str, str]:
    """Per scope ('cpu': what a CPU runner runs; 'gpu': what needs CUDA): its verdict, or not_planned."""
    out = {}
    for scope in SCOPES:
        rows = [c for c in checks if c.get("scope") == scope]
        if not rows:
            out[scope] = "not_planned"
        elif all(c["status"] == "not_applicable" for c in rows):
            out[scope] = "not_applicable"
        else:
            out[scope] = verdict_of(rows)
    return out


def _backend_suites(rows: list[dict[str, Any]]) -> str:
    by_backend: dict[str, list[str]] = {}
    for row in rows:
        suites = by_backend.setdefault(row["backend"], [])
        if row["suite"] not in suites:
            suites.append(row["suite"])
    return ", ".join(f"{b} ({', '.join(s)})" for b, s in by_backend.items())


def summary_line(checks: list[dict[str, Any]]) -> str:
    """"CPU scope certified: hf, megatron; GPU scope not run here: sglang (logits)" — what people read first."""
    parts = []
    for scope, verdict in scope_verdicts(checks).items():
        rows = [c for c in checks if c.get("scope") == scope]
        label = scope.upper()
        if verdict == "not_planned":
            parts.append(f"{label} scope: nothing planned")
        elif verdict == "certified":
            backends = list(dict.fromkeys(c["backend"] for c in rows if c["status"] == "passed"))
            parts.append(f"{label} scope certified: {', '.join(backends)}")
        elif verdict == "failed":
            parts.append(f"{label} scope failed: "
                         f"{_backend_suites([c for c in rows if c['status'] in ('failed', 'error')])}")
        elif verdict == "not_applicable":
            parts.append(f"{label} scope not applicable")
        else:
            missing = [c for c in rows if c["status"] == "not_run"]
            parts.append(f"{label} scope not run here: {_backend_suites(missing)}" if missing
                         else f"{label} scope incomplete")
    return "; ".join(parts)


GIB = 1 << 30


def checkpoint_bytes(directory: str | Path) -> int:
    """Bytes of a checkpoint's weight files (*.safetensors, *.bin) in `directory`; 0 where it has none."""
    return sum(p.stat().st_size for p in Path(directory).iterdir()
               if p.is_file() and p.suffix in (".safetensors", ".bin"))


def judge_resources(workers: dict[str, dict[str, Any]], checkpoint_bytes: int | None, factor: float,
                    extra_gib: float, train_factor: float | None = None) -> dict[str, Any]:
    """Every worker's peak RSS against factor × the checkpoint's bytes + extra_gib GiB (the spec's peak_rss_bound);
    a worker that trained (its record's `trains`) against train_factor × the checkpoint + extra_gib where the spec
    sets one: an AdamW step holds weights, gradients and two moments, 4 × the fp32 weights, by itself.

    not_run, never passed, when nothing was measured or no checkpoint was materialized to scale the bound by."""
    out = {"checkpoint_bytes": checkpoint_bytes, "checkpoint_factor": factor, "extra_gib": extra_gib,
           "limit_bytes": None}
    if train_factor is not None:
        out.update(train_checkpoint_factor=train_factor, train_limit_bytes=None)
    if not checkpoint_bytes:
        return {**out, "status": "not_run", "reason": "no reference checkpoint was materialized in this run: "
                                                      "the bound has nothing to scale"}
    if not workers:
        return {**out, "status": "not_run", "reason": "no backend worker ran in this run"}
    limit = int(factor * checkpoint_bytes + extra_gib * GIB)
    out["limit_bytes"] = limit
    if train_factor is not None:
        out["train_limit_bytes"] = int(train_factor * checkpoint_bytes + extra_gib * GIB)

    def limit_of(record: dict[str, Any]) -> int:
        return out["train_limit_bytes"] if train_factor is not None and record.get("trains") else limit

    over = {name: r["peak_rss_bytes"] for name, r in workers.items() if r["peak_rss_bytes"] > limit_of(r)}
    if over:
        return {**out, "status": "failed", "reason": "; ".join(
            f"{name} peaked at {peak / GIB:.2f} GiB > {limit_of(workers[name]) / GIB:.2f} GiB"
            for name, peak in over.items())}
    worst = max(workers, key=lambda name: workers[name]["peak_rss_bytes"] / limit_of(workers[name]))
    peak, worst_limit = workers[worst]["peak_rss_bytes"], limit_of(workers[worst])
    return {**out, "status": "passed",
            "reason": f"worst {worst} at {peak / GIB:.2f} GiB, {peak / worst_limit:.2f} of {worst_limit / GIB:.2f} GiB"
                      + (" (its train limit)" if worst_limit != limit else "")}


def resources_section(workers: dict[str, dict[str, Any]], checkpoint_bytes: int | None = None,
                      bound: Any = None) -> dict[str, Any]:
    """The certificate's `resources`; `bound` is the spec's peak_rss_bound (None: shown, not judged)."""
    from .workers import SAMPLE_INTERVAL_S

    section = {"workers": workers, "sampling": f"/proc every {SAMPLE_INTERVAL_S}s over each worker's process group: "
                                               "its members' PSS summed, floored by the largest one's VmHWM"}
    if bound is not None:
        section["bound"] = judge_resources(workers, checkpoint_bytes, bound.checkpoint_factor, bound.extra_gib,
                                           bound.train_checkpoint_factor)
    return section


def final_verdict(checks: list[dict[str, Any]], resources: dict[str, Any] | None) -> str:
    """The checks' verdict, failed where the spec's resource bound failed (a certified model must also fit)."""
    verdict = verdict_of(checks)
    if (resources or {}).get("bound", {}).get("status") == "failed":
        return "failed"
    return verdict


def final_summary(checks: list[dict[str, Any]], resources: dict[str, Any] | None) -> str:
    bound = (resources or {}).get("bound")
    line = summary_line(checks)
    return f"{line}; peak RSS over its bound: {bound['reason']}" if bound and bound["status"] == "failed" else line


def canonical(cert: dict[str, Any]) -> bytes:
    """The bytes the integrity seal covers: everything but the seal, keys sorted."""
    body = {k: v for k, v in cert.items() if k != "integrity"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def seal(cert: dict[str, Any], key: str | None = None) -> dict[str, str]:
    """sha256 of the canonical body (catches hand edits); with a signing key also an HMAC (catches forgery)."""
    import hashlib
    import hmac

    body = canonical(cert)
    out = {"sha256": hashlib.sha256(body).hexdigest()}
    key = key if key is not None else os.environ.get(SIGNING_KEY_ENV)
    if key:
        out["hmac_sha256"] = hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    return out


def build(model: str, spec_sha256: str, versions: dict[str, str], checks: list[dict[str, Any]],
          command: str = "", spec_path: str = "", spec_text: str = "", device: dict[str, Any] | None = None,
          calibration: dict[str, Any] | None = None, reference: dict[str, Any] | None = None,
          resources: dict[str, Any] | None = None) -> dict[str, Any]:
    cert = {
        "certificate_version": CERTIFICATE_VERSION,
        "model": model,
        "spec_sha256": spec_sha256,
        "spec_path": spec_path,
        "spec_text": spec_text,
        "verdict": final_verdict(checks, resources),
        "scopes": scope_verdicts(checks),
        "summary": final_summary(checks, resources),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "versions": versions,
        "device": device or {"kind": "cpu"},
        "calibration": calibration,  # {file, sha256, generated} of the checked-in calibration its bounds cite
        "checks": checks,
    }
    if reference is not None:  # a real checkpoint (reference.path): the files certified, with their sha256
        cert["reference"] = reference
    if resources is not None:  # each worker's wall time and peak RSS (and the spec's bound on them)
        cert["resources"] = resources
    cert["integrity"] = seal(cert)
    return cert


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


def bound_text(key: str, bound: Any) -> str:
    """'max_abs_logprob≤0.24 (calibrated)', or '… (spec, loosened by the spec)'."""
    if not isinstance(bound, dict):
        return f"{key}{'≥' if key.startswith('min_') else '≤'}{_short(bound)}"
    text = f"{key}{'≤' if bound.get('upper', True) else '≥'}{_short(bound.get('value'))} ({bound.get('source')}"
    if isinstance(relative := bound.get("relative"), dict):  # tolerances.RELATIVE
        text += f": {_short(relative['atol'])} + {_short(relative['rtol'])} × {_short(relative['scale'])}"
    if bound.get("loosened_by_spec"):
        text += f", loosened by the spec from {_short(bound.get('harness_value'))}"
    if isinstance(bound.get("evidence"), dict):  # the checked-in calibration's measurement it rests on
        text += f", calibration file measured {_short(bound['evidence'].get('measured'))}"
    return text + ")"


def resources_markdown(resources: dict[str, Any] | None) -> list[str]:
    if not resources:
        return []
    lines = ["| worker | trained | wall s | peak RSS GiB | largest process GiB |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {'yes' if r.get('trains') else 'no'} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / GIB:.2f} | "
              f"{r['largest_process_rss_bytes'] / GIB:.2f} |" for name, r in resources["workers"].items()]
    if bound := resources.get("bound"):
        trained = (f"; a worker that trained: {bound['train_checkpoint_factor']:g} × checkpoint + "
                   f"{bound['extra_gib']:g} GiB" if bound.get("train_checkpoint_factor") is not None else "")
        lines += ["", f"peak RSS bound ({bound['checkpoint_factor']:g} × checkpoint + {bound['extra_gib']:g} GiB"
                      f"{trained}): **{bound['status']}**, {bound['reason']}"]
    return [*lines, ""]


def render_markdown(cert: dict[str, Any]) -> str:
    from .device import describe

    icon = {"passed": "✅ passed", "failed": "❌ failed", "error": "💥 error", "not_run": "⏭️ not run",
            "not_applicable": "➖ not applicable"}
    lines = [
        f"# {cert['model']}: **{cert['verdict']}**",
        "",
        f"**{cert.get('summary', '')}**",
        "",
        f"spec sha256 `{cert['spec_sha256'][:16]}…` · {cert['created']}"
        + (f" · reproduce: `{cert['command']}`" if cert.get("command") else ""),
        "",
        f"device: {describe(cert.get('device'))}",
        "",
        *([f"calibration: `{cal['file']}` (sha256 `{cal['sha256'][:16]}…`, generated {cal['generated']})", ""]
          if (cal := cert.get("calibration")) else []),
        *([f"reference checkpoint: `{ref['path']}` ({len(ref['files'])} files"
           + (", sharded" if ref["sharded"] else "") + "): "
           + ", ".join(f"`{f['name']}` sha256 `{f['sha256'][:16]}…`" for f in ref["files"]), ""]
          if (ref := cert.get("reference")) else []),
        *resources_markdown(cert.get("resources")),
        "| check | status | metrics | tolerance | reason |",
        "|---|---|---|---|---|",
    ]
    for check in cert["checks"]:
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in check.get("metrics", {}).items() if _short(v))
        tolerance = ", ".join(bound_text(k, v) for k, v in check.get("tolerance", {}).items())
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
