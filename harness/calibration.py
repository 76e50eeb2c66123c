"""The checked-in calibration file a spec cites (written by `python -m harness calibrate`).

A spec names it with `calibration: calibration/<name>.json` (relative to the spec file); without the key,
model_specs/calibration/<name>.json is used when it exists. The certificate carries {file, sha256,
generated}, and every bound the file measured gets an `evidence` entry citing it (harness.tolerances.cite),
so a reader sees which measurement a bound rests on and `verify` can check the file is still the same.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SpecError
from .spec import REPO_ROOT, SPECS_DIR

CALIBRATION_DIR = SPECS_DIR / "calibration"
FORMAT_VERSION = 1
# the suites judged on full-vocabulary log-probs at prompt positions: what the file measures
EVIDENCE_SUITES = ("logits", "refit")
REQUIRED = ("calibration_version", "model", "generated", "float32", "bfloat16")


def display_path(path: Path) -> str:
    """Repo-relative where it can be (certificates travel between checkouts), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def cited_path(file: str) -> Path:
    """A certificate's `calibration.file` on this machine (repo-relative paths are under this checkout)."""
    return Path(file) if Path(file).is_absolute() else REPO_ROOT / file


def path_for(spec) -> Path | None:
    """The spec's calibration file: its `calibration` key, else the default one when it exists."""
    if spec.calibration is not None:
        return spec.resolve_relative(spec.calibration)
    default = CALIBRATION_DIR / f"{spec.name}.json"
    return default if default.is_file() else None


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def read(path: Path, model: str | None = None) -> dict[str, Any]:
    """The file's JSON, checked enough to cite; SpecError naming the file and the key otherwise."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(path, None, f"cannot read the calibration file: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError(path, None, f"not a calibration file (malformed JSON: {exc})") from None
    if not isinstance(data, dict):
        raise SpecError(path, None, f"expected a JSON object, got {type(data).__name__}")
    for key in REQUIRED:
        if key not in data:
            raise SpecError(path, key, "required key is missing (regenerate: python -m harness calibrate)")
    if data["calibration_version"] != FORMAT_VERSION:
        raise SpecError(path, "calibration_version", f"{data['calibration_version']!r}: this harness reads "
                                                     f"version {FORMAT_VERSION}")
    if model is not None and data["model"] != model:
        raise SpecError(path, "model", f"the file calibrates {data['model']!r}, the spec is {model!r}")
    for dtype in ("float32", "bfloat16"):
        section = data[dtype]
        if not isinstance(section, dict) or not isinstance(section.get("metrics"), dict):
            raise SpecError(path, f"{dtype}.metrics", "expected an object of metric -> measurement")
        for metric, entry in section["metrics"].items():
            value = entry.get("measured") if isinstance(entry, dict) else "absent"
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value)):
                raise SpecError(path, f"{dtype}.metrics.{metric}.measured", f"{value!r} is not a finite number")
    return data


@dataclass(frozen=True)
class Citation:
    path: Path
    sha256: str
    data: dict[str, Any]

    @property
    def file(self) -> str:
        return display_path(self.path)

    def as_dict(self) -> dict[str, Any]:
        """The certificate's top-level `calibration`."""
        return {"file": self.file, "sha256": self.sha256, "generated": self.data["generated"]}

    def evidence(self, suite: str, dtype: str, key: str, record: dict[str, Any]) -> dict[str, Any] | None:
        """What the file measured for this bound: fp32 defaults and calibrated bf16 bounds of the log-prob suites."""
        from .tolerances import calibrated_value, calibration_factor

        wanted = (dtype or "float32", record.get("source"))
        if suite not in EVIDENCE_SUITES or wanted not in (("float32", "default"), ("bfloat16", "calibrated")):
            return None
        entry = self.data[wanted[0]]["metrics"].get(record.get("metric"))
        if not isinstance(entry, dict) or entry.get("measured") is None:
            return None
        out = {"file": self.file, "sha256": self.sha256, "measured": entry["measured"], "what": entry.get("what", "")}
        if wanted[0] == "bfloat16":  # the bound the grid's worst noise would give in this suite
            out["grid_bound"] = calibrated_value(key, entry["measured"], calibration_factor(suite))
        return out


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(spec) -> Citation | None:
    """The spec's calibration, checked (SpecError naming the file and key); None when it has none."""
    path = path_for(spec)
    if path is None:
        return None
    if not path.is_file():
        raise SpecError(spec.source, "calibration", f"{path} does not exist (python -m harness calibrate "
                                                    f"--model {spec.name} writes it)")
    return Citation(path, sha256_of(path), read(path, spec.name))
