"""The Ray executor: a backend's rank group as Ray actors, one per rank, each pinned to its own bundle of
one placement group (CPU; plus one GPU on cuda). Rank 0's actor publishes its host and a free port, every
actor sets up its process group through rank_setup.init_rank (gloo / NCCL) and runs the same rank
function as the local spawn path. The first rank that raises, dies or outlives the group timeout ends the
group: an error naming it with its log tail; actors and the placement group are released either way.

Inputs and outputs are files (the job, shards, results): on several hosts the harness's temp folder
must be on a filesystem every host shares, with the same checkout and Python on each.
ray 2.60.0 on CPU: with no address, one local Ray instance per worker process, on loopback, reused.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

from .rank_setup import LOCAL_RANK_ENV, MASTER_ADDR_ENV

# what the ranks inherit from the worker on the local path, forwarded to actors (a cluster's own
# processes do not have it): harness seams and caches, torch/DeepSpeed/NCCL/gloo settings, the import path,
# glibc's allocator settings (harness.workers.MALLOC_ENV: read when a process starts, as an actor's does)
FORWARDED = ("HARNESS_", "CERTIFY_", "DS_", "TORCH_", "NCCL_", "GLOO_", "HF_", "TRANSFORMERS_", "PYTHONPATH",
             "MALLOC_")
TAIL_CHARS = 2000
_LOCAL: dict[str, int] = {}  # the local instance this process started: {"cpus": N}
_INIT = threading.Lock()  # ensure_ray from the worker's start (start_in_background) and from a rank group


class RankGroupError(RuntimeError):
    """A rank of a Ray rank group raised, died or hung; the message names it and carries its log tail."""


class _RankActor:
    """One rank (wrapped by ray.remote): its own process, its own bundle."""

    def node(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's host and a port free on it (the TCP store binds it in init_process_group)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def run(self, run_rank, rank: int, world: int, port: int, job_path: str, env: dict, threads: int,
            log_path: str) -> dict:
        import traceback

        if not Path(job_path).is_file():
            return {"ok": False, "error": f"{job_path} is not visible on {socket.gethostname()}: the Ray executor "
                                          "needs the harness's temp folder on a filesystem every host shares"}
        log = open(log_path, "w", buffering=1)  # noqa: SIM115 - the actor's fds point here until it is killed
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        os.environ.update(env)
        try:
            import torch

            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1; the local path's ranks use the default
            run_rank(rank, world, port, job_path)
            return {"ok": True}
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a library is a failed rank too
            traceback.print_exc()
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()


def ensure_ray(address: str | None, cpus: int, device: str = "cpu"):
    """Join the cluster at `address`, or start (once per process) a local instance with `cpus` CPUs."""
    if address is None:
        # before ray is imported: a local instance binds loopback only (ray.init's _node_ip_address does
        # not), and never reports usage statistics
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with _INIT:
        if ray.is_initialized():
            if address is not None or not _LOCAL or _LOCAL["cpus"] >= cpus:
                return ray
            ray.shutdown()  # a larger group than this local instance was sized for
        options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        if address is None:
            ray.init(address="local", num_cpus=cpus, num_gpus=None if device == "cuda" else 0,
                     object_store_memory=128 << 20, **options)
            _LOCAL["cpus"] = cpus
        else:
            ray.init(address=address, **options)
    return ray


def start_in_background(address: str | None, cpus: int, device: str = "cpu") -> threading.Thread:
    """ensure_ray on a daemon thread. A failure there is not reported: the rank group's own ensure_ray (which
    waits for this one through _INIT) tries again and raises it where a check can name it. The thread then
    stays parked for the process's life: a local instance's node processes get the parent-death signal
    (PR_SET_PDEATHSIG) when the *thread* that started them ends (measured: the GCS died, every later ray call
    failed to connect)."""
    def start() -> None:
        try:
            ensure_ray(address, cpus, device)
        except Exception:  # noqa: BLE001 - reported by the rank group's own call
            return
        threading.Event().wait()

    thread = threading.Thread(target=start, name="harness-ray-start", daemon=True)
    thread.start()
    return thread


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-TAIL_CHARS:].strip() or "(empty log)"
    except OSError:
        return f"(no log at {path} on this host)"


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}


def run_ranks(run_rank, world: int, job_path: str, device: str = "cpu", address: str | None = None,
              timeout: float = 810.0, cpus: int | None = None, attempts: int = 3) -> None:
    """Run `run_rank(rank, world, port, job_path)` as `world` Ray actors; raise RankGroupError on failure."""
    import torch

    ray = ensure_ray(address, max(cpus or world, world), device)
    from ray.util.placement_group import placement_group, remove_placement_group

    deadline = time.monotonic() + timeout
    bundle = {"CPU": 1, **({"GPU": 1} if device == "cuda" else {})}
    total = ray.cluster_resources()
    short = [k for k, v in bundle.items() if total.get(k, 0) < v * world]
    if short:
        raise RankGroupError(f"the Ray cluster cannot hold {world} ranks of {bundle}: it has "
                             f"{ {k: total.get(k, 0) for k in bundle} }")
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            raise RankGroupError(f"Ray placed no group of {world} ranks of {bundle} within {timeout:.0f}s")
        for attempt in range(attempts):
            failure = _run_once(ray, pg, run_rank, world, job_path, device, deadline, torch.get_num_threads())
            if failure is None:
                return
            if "EADDRINUSE" not in failure or attempt == attempts - 1:
                raise RankGroupError(failure)
    finally:
        remove_placement_group(pg)


def _run_once(ray, pg, run_rank, world, job_path, device, deadline, threads) -> str | None:
    """One try of the group; the failure's message, or None. Every actor is killed before returning."""
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_class = ray.remote(_RankActor)
    actors = [actor_class.options(
        num_cpus=1, num_gpus=1 if device == "cuda" else 0, max_restarts=0,
        runtime_env={"env_vars": _forwarded_env()},
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
    ).remote() for rank in range(world)]
    logs = [Path(job_path).with_name(f"ray-rank{rank}.log") for rank in range(world)]
    try:
        try:
            nodes = ray.get([a.node.remote() for a in actors], timeout=max(deadline - time.monotonic(), 1))
            host, port = ray.get(actors[0].rendezvous.remote(), timeout=max(deadline - time.monotonic(), 1))
        except (GetTimeoutError, RayActorError) as exc:
            return f"the Ray actors of {world} ranks did not start: {str(exc).splitlines()[0]}"
        refs = {}
        for rank, actor in enumerate(actors):
            # cpu: the rank's index among this group's ranks on its host (= rank on one host, as locally);
            # cuda: Ray gives each actor one GPU (CUDA_VISIBLE_DEVICES), so it is GPU 0 there
            local = 0 if device == "cuda" else [n for n, _ in nodes[:rank]].count(nodes[rank][0])
            env = {MASTER_ADDR_ENV: host, LOCAL_RANK_ENV: str(local)}
            refs[actor.run.remote(run_rank, rank, world, port, job_path, env, threads, str(logs[rank]))] = rank
        pending = list(refs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = sorted(refs[r] for r in pending)
                tails = "\n".join(f"--- rank {r} log tail ---\n{_tail(logs[r])}" for r in stuck)
                return f"ranks {stuck} of {world} (Ray actors) still running after the group timeout\n{tails}"
            done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 5.0))
            for ref in done:
                rank = refs[ref]
                try:
                    result = ray.get(ref)
                except RayActorError as exc:
                    pid = re.search(r"pid: (\d+)", str(exc))
                    why = f"died: its process exited ({type(exc).__name__}{f', pid {pid[1]}' if pid else ''})"
                else:
                    if result["ok"]:
                        continue
                    why = f"raised {result['error']}"
                return f"rank {rank} of {world} (Ray actor on {nodes[rank][1]}) {why}\n" \
                       f"--- rank {rank} log tail ---\n{_tail(logs[rank])}"
        return None
    finally:
        for actor in actors:  # the others wait in a collective for the failed one: stop them all
            ray.kill(actor, no_restart=True)
