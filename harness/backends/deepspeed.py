"""DeepSpeed as ROLL's deepspeed_train / deepspeed_infer strategies run it.

Every case (ZeRO stage x dtype x world size) runs in fresh processes: DeepSpeed keeps global
state and, under ZeRO-3, patches torch functions. deepspeed 0.19.8 on CPU needs
DS_ACCELERATOR=cpu and gloo; its first run JIT-builds a comm op into TORCH_EXTENSIONS_DIR
(~150 s cold, cached afterwards) under torch's FileBaton lock file, which every other rank waits on for as
long as it exists: a build killed midway leaves it, so a lock older than any build is refused, named, before
ranks start (they would otherwise sleep until the worker's timeout with an empty log). With --device cuda each rank runs DS_ACCELERATOR=cuda and
NCCL on its own GPU (LOCAL_RANK; the engine places the module there).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..executor import prestart, run_rank_group
from .base import Backend


SHM_COMM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.ShareMemCommBuilder.NAME
STALE_LOCK_S = 900  # six times a cold build of the comm op here


def extensions_root() -> Path:
    """Where torch JIT-builds extensions for this interpreter and accelerator (TORCH_EXTENSIONS_DIR or the default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(SHM_COMM_OP, verbose=False)).parent


def stale_build_locks(root: Path, now: float | None = None) -> list[Path]:
    """Extension build locks under `root` older than any build takes: a killed build's leftovers."""
    now = time.time() if now is None else now
    return sorted(lock for lock in Path(root).glob("*/lock") if now - lock.stat().st_mtime > STALE_LOCK_S)


def refuse_stale_build_locks(root: Path) -> None:
    stale = stale_build_locks(root)
    if stale:
        age = (time.time() - stale[0].stat().st_mtime) / 60
        raise RuntimeError(f"{stale[0]}: a torch extension build lock left {age:.0f} min ago by a build that did "
                           f"not finish; every DeepSpeed rank would wait on it forever (delete it if no build is "
                           f"running)")


def accelerator_for(device: str) -> str:
    """DS_ACCELERATOR for the session's device: DeepSpeed's cpu accelerator (gloo) or its cuda one (NCCL)."""
    return "cuda" if device == "cuda" else "cpu"


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    suites = ("train", "logits")
    probe_module = "deepspeed"
    packages = ("torch", "deepspeed")

    def setup(self) -> None:
        # the ranks set it from the job's device; this is for anything importing deepspeed in the worker
        os.environ["DS_ACCELERATOR"] = accelerator_for(self.device)
        prestart(self.spec, self.device)  # the Ray executor's start overlaps the rest

    def _spawn(self, job: dict[str, Any], world: int) -> None:
        from .deepspeed_ranks import run_rank

        if self.device != "cuda":  # the cpu accelerator's comm op is the one JIT-built
            refuse_stale_build_locks(extensions_root())
        job = {**job, "spec_path": str(self.spec.source) if self.spec and self.spec.source else None,
               "device": self.device}
        with tempfile.TemporaryDirectory(prefix="harness-ds-") as tmp:
            job_path = f"{tmp}/job.json"
            Path(job_path).write_text(json.dumps(job))
            run_rank_group(run_rank, world, job_path, self.spec, self.device)  # local spawn or Ray actors

    def op_train(self, dir: str, stage: int, dtype: str, world: int, sequences: list[list[int]],  # noqa: A002
                 steps: int, out_dir: str) -> dict[str, Any]:
        self._spawn({"mode": "train", "dir": dir, "stage": stage, "dtype": dtype, "sequences": sequences,
                     "steps": steps, "out_dir": out_dir}, world)
        return json.loads((Path(out_dir) / "result.json").read_text())

    def op_logprobs(self, dir: str, dtypes: list[str], prompts: dict[str, list[list[int]]],  # noqa: A002
                    out_dir: str, stage: int = 3, world: int = 1) -> dict[str, Any]:
        """deepspeed_infer: ZeRO-3 (by default) eval forward, full-vocabulary log-probs; at world size > 1
        each data-parallel rank scores its own rows of every prompt set."""
        for dtype in dtypes:
            self._spawn({"mode": "infer", "dir": dir, "stage": stage, "dtype": dtype, "prompts": prompts,
                         "out_dir": f"{out_dir}/{dtype}"}, world)
        return {"files": {d: f"{out_dir}/{d}/logprobs.safetensors" for d in dtypes}, "load_problems": []}

    def op_capture(self, dir: str, dtypes: list[str], sequences: list[list[int]], out_dir: str,  # noqa: A002
                   stage: int = 3, world: int = 1) -> dict[str, Any]:
        """Divergence localization: the HF module's activation points inside the (ZeRO-3) engine, per dtype."""
        files = {d: f"{out_dir}/{d}/capture.safetensors" for d in dtypes}
        for dtype in dtypes:
            self._spawn({"mode": "capture", "dir": dir, "stage": stage, "dtype": dtype, "sequences": sequences,
                         "out_path": files[dtype]}, world)
        from ..convert.stream import hf_tensor_names

        config = json.loads((Path(dir) / "config.json").read_text())
        return {"files": files, "load_problems": [], "origin": {"hf_names": hf_tensor_names(dir)},
                "num_layers": int(config["num_hidden_layers"])}


BACKEND = DeepSpeedBackend
