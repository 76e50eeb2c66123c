"""Where a certification runs: `--device cpu|cuda` (env form CERTIFY_DEVICE) and CERTIFY_GPUS.

Parent side, plain Python (no pytest): the pytest plugin turns a DeviceError into a usage error
(exit 4), the session gates checks on the GPU count, and the certificate records `record()`.
On CPU the multi-rank backends run gloo ranks as processes (no count limit); on CUDA every rank
holds one GPU, so a layout needing more ranks than usable GPUs is not_run naming both numbers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

DEVICE_ENV = "CERTIFY_DEVICE"
GPUS_ENV = "CERTIFY_GPUS"
KINDS = ("cpu", "cuda")


class DeviceError(Exception):
    """--device / CERTIFY_DEVICE / CERTIFY_GPUS cannot be honoured here (one line, a usage error)."""


@dataclass(frozen=True)
class Device:
    kind: str = "cpu"
    gpus: int = 0  # GPUs this run may use: min(visible, CERTIFY_GPUS); 0 on cpu
    visible: int = 0  # GPUs torch sees on this machine
    cap: int | None = None  # CERTIFY_GPUS, when set
    hide_gpus: bool = False  # --device cpu where GPUs exist: workers get CUDA_VISIBLE_DEVICES="" (cpu means cpu)

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    def short_of(self, needed: int) -> str | None:
        """Why a check needing `needed` GPUs (one per rank) cannot run here; None when it can (or on cpu)."""
        if not self.cuda or needed <= self.gpus:
            return None
        text = f"needs {needed} GPUs, {self.gpus} visible"
        if self.cap is not None and self.cap < self.visible:
            text += f" ({GPUS_ENV}={self.cap}; {self.visible} on this machine)"
        return text


CPU = Device()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select(requested: str | None = None, env: Mapping[str, str] | None = None) -> Device:
    """--device (else CERTIFY_DEVICE, else cuda where torch sees a GPU, else cpu) and CERTIFY_GPUS."""
    env = os.environ if env is None else env
    source = "--device" if requested else DEVICE_ENV
    kind = (requested or env.get(DEVICE_ENV) or "").strip().lower()
    if kind and kind not in KINDS:
        raise DeviceError(f"{source}: {kind!r} is not a device (known: {', '.join(KINDS)})")
    cap_text = (env.get(GPUS_ENV) or "").strip()
    cap = None
    if cap_text:
        try:
            cap = int(cap_text)
        except ValueError:
            cap = 0
        if cap < 1:
            raise DeviceError(f"{GPUS_ENV}: {cap_text!r} is not a GPU count (a whole number >= 1)")
    visible = _cuda_count()
    if kind == "cpu":
        return Device(hide_gpus=True) if visible else CPU
    if not visible:
        if kind == "cuda":
            raise DeviceError(f"{source} cuda: torch sees no CUDA GPU on this machine "
                              f"(torch.cuda.is_available() is False); use --device cpu")
        return CPU
    return Device("cuda", min(visible, cap) if cap else visible, visible, cap)


def _nvidia_smi(query: str) -> str | None:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        proc = subprocess.run([binary, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[0] if proc.returncode == 0 and lines else None


def record(device: Device) -> dict[str, Any]:
    """The certificate's `device`: {"kind": "cpu"} or the GPUs the checks ran on (never fails for a fact)."""
    if not device.cuda:
        return {"kind": "cpu"}
    import torch

    try:
        name = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a missing fact is recorded as None, not a failed run
        name = _nvidia_smi("name")
    out: dict[str, Any] = {"kind": "cuda", "gpu": name, "count": device.gpus,
                           "driver": _nvidia_smi("driver_version"), "cuda": torch.version.cuda}
    if device.gpus != device.visible:
        out["visible"] = device.visible
    return out


def describe(device: Mapping[str, Any] | None) -> str:
    """One line for people: 'cpu', or 'cuda: 2 × NVIDIA H100 (driver 550.54, CUDA 12.4)'."""
    device = device or {"kind": "cpu"}
    executor = device.get("executor") if isinstance(device.get("executor"), dict) else None
    if executor:  # ranks started by Ray (the default local spawn is not recorded)
        ray = f"ray {executor.get('ray')}, " if executor.get("ray") else ""
        return f"{describe({k: v for k, v in device.items() if k != 'executor'})} · " \
               f"{executor.get('kind')} executor ({ray}{executor.get('address', 'local instance')})"
    if device.get("kind") != "cuda":
        return str(device.get("kind", "cpu"))
    text = f"cuda: {device.get('count', '?')} × {device.get('gpu') or 'unknown GPU'}"
    facts = [f"driver {device['driver']}" if device.get("driver") else "",
             f"CUDA {device['cuda']}" if device.get("cuda") else "",
             f"{device['visible']} visible, capped by {GPUS_ENV}" if device.get("visible") else ""]
    facts = [f for f in facts if f]
    return text + (f" ({', '.join(facts)})" if facts else "")
