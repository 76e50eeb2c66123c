"""Rank functions that misbehave on purpose, run by the harness's executors inside a real worker
(Worker("tests.ray_ranks:RankGroupBackend", spec)), as tests/test_ray_executor.py drives them."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness.backends.base import Backend


def run_rank(rank: int, world: int, port: int, job_path: str) -> None:
    """Join the group; rank 1 then fails as the job says while the others wait for it in a collective."""
    import torch
    import torch.distributed as dist

    from harness.backends.rank_setup import init_rank

    job = json.loads(Path(job_path).read_text())
    init_rank(rank, world, port, "cpu")
    if rank == 1 and job["kind"] != "ok":
        print(f"rank 1 about to {job['kind']}: {job['marker']}", file=sys.stderr, flush=True)
        if job["kind"] == "raise":
            raise ValueError(f"planted failure {job['marker']}")
        if job["kind"] == "exit":
            os._exit(3)
        time.sleep(3600)  # hang
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    Path(job["out_dir"], f"rank{rank}.json").write_text(json.dumps({"sum": total.item(), "pid": os.getpid()}))
    dist.destroy_process_group()


class RankGroupBackend(Backend):
    name = "rank-group"
    suites = ()

    def op_group(self, kind: str, world: int, out_dir: str, marker: str = "") -> dict:
        from harness.executor import run_rank_group

        with tempfile.TemporaryDirectory(prefix="harness-raytest-") as tmp:
            job_path = f"{tmp}/job.json"
            Path(job_path).write_text(json.dumps({"kind": kind, "marker": marker, "out_dir": out_dir}))
            run_rank_group(run_rank, world, job_path, self.spec, self.device)
        return {"ranks": sorted(p.name for p in Path(out_dir).glob("rank*.json"))}

    def op_leftovers(self) -> dict:
        """Actors alive and placement groups not removed in this worker's Ray (GCS tables: no dashboard)."""
        import ray
        import ray._private.state as state
        from ray.util.placement_group import placement_group_table

        if not ray.is_initialized():
            return {"ray": False, "actors": [], "placement_groups": []}
        deadline = time.monotonic() + 30  # ray.kill is asynchronous
        while True:
            actors = [a for a, info in state.actors().items() if info["State"] != "DEAD"]
            groups = [g for g, info in placement_group_table().items() if info["state"] != "REMOVED"]
            if not (actors or groups) or time.monotonic() > deadline:
                return {"ray": True, "actors": actors, "placement_groups": groups, "pid": os.getpid()}
            time.sleep(0.5)
