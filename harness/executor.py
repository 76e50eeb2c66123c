"""Who starts a backend's rank group (Megatron pp * lcm(tp, ep), DeepSpeed world size): the executor.

`local` (default): torch.multiprocessing spawn on this machine (base.spawn_ranks). `ray`: one Ray actor
per rank on a placement group (harness/backends/ray_executor.py), on a local Ray instance or the cluster
at the Ray address. Chosen by --executor/--ray-address, else CERTIFY_EXECUTOR/CERTIFY_RAY_ADDRESS, else
the spec's `executor:` section. The session hands its choice to the workers as those variables, so the
parent (certificate) and the workers (ranks) resolve it the same way. Cheap to import: no ray, no torch.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Mapping

EXECUTOR_ENV = "CERTIFY_EXECUTOR"
RAY_ADDRESS_ENV = "CERTIFY_RAY_ADDRESS"
KINDS = ("local", "ray")
RAY_PIN = "ray==2.60.0"  # pyproject's pin, named in the install hint
# a hung rank group is stopped (its actors' log tails reported) this far into the worker timeout, so the
# error names the ranks before the parent would kill the worker with nothing but its own stderr
GROUP_TIMEOUT_FRACTION = 0.9


class ExecutorError(Exception):
    """--executor / --ray-address / CERTIFY_EXECUTOR cannot be honoured (one line, a usage error)."""


@dataclass(frozen=True)
class Executor:
    kind: str = "local"
    address: str | None = None  # ray: a cluster address; None starts a local instance per worker

    def record(self) -> dict[str, Any] | None:
        """The certificate's device.executor (None for the default local spawn, which stays unrecorded)."""
        if self.kind == "local":
            return None
        try:
            version = importlib.metadata.version("ray")
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        return {"kind": self.kind, "address": self.address or "local instance", "ray": version}


LOCAL = Executor()


def resolve(spec=None, kind: str | None = None, address: str | None = None,
            env: Mapping[str, str] | None = None) -> Executor:
    """The executor for one spec: the option, else the environment, else the spec, else local."""
    env = os.environ if env is None else env
    section = getattr(spec, "executor", None)
    spec_name = f"{spec.source}: executor" if spec is not None and spec.source else "spec executor"
    chosen = [(v, where) for v, where in ((kind, "--executor"), (env.get(EXECUTOR_ENV), EXECUTOR_ENV),
                                           (getattr(section, "kind", None), f"{spec_name}.kind")) if v]
    value, source = (chosen[0][0].strip().lower(), chosen[0][1]) if chosen else ("local", "")
    if value not in KINDS:
        raise ExecutorError(f"{source}: {value!r} is not an executor (known: {', '.join(KINDS)})")
    if value == "local":
        if address:
            raise ExecutorError(f"--ray-address {address}: needs --executor ray")
        return LOCAL
    if importlib.util.find_spec("ray") is None:
        raise ExecutorError(f"{source} ray: ray is not installed (pip install {RAY_PIN})")
    where = address or env.get(RAY_ADDRESS_ENV) or getattr(section, "ray_address", None)
    return Executor("ray", where.strip() if where and where.strip() else None)


def worker_env(kind: str | None, address: str | None) -> dict[str, str]:
    """The command line's choice as the workers' environment (the environment's own is inherited)."""
    out = {EXECUTOR_ENV: kind} if kind else {}
    if address:
        out[RAY_ADDRESS_ENV] = address
    return out


def group_timeout(spec) -> float:
    return GROUP_TIMEOUT_FRACTION * float(getattr(spec, "worker_timeout_s", None) or 900.0)


def run_rank_group(run_rank, world: int, job_path: str, spec=None, device: str = "cpu") -> None:
    """Run `run_rank(rank, world, port, job_path)` on `world` ranks with the spec's executor (worker side)."""
    executor = resolve(spec)
    if executor.kind == "local":
        from .backends.base import spawn_ranks

        spawn_ranks(run_rank, world, job_path)
        return
    from .backends import ray_executor

    ray_executor.run_ranks(run_rank, world, job_path, device=device, address=executor.address,
                           timeout=group_timeout(spec), cpus=group_cpus(spec, world))


def group_cpus(spec=None, world: int = 1) -> int:
    """The CPUs a local Ray instance is sized for: the largest rank group the spec plans (Megatron pp * lcm(tp,
    ep), DeepSpeed's world sizes), so that one instance serves every layout."""
    sizes = [layout.world_size for layout in getattr(spec, "parallel", None) or []]
    sizes += list(getattr(getattr(spec, "deepspeed", None), "world_sizes", None) or [])
    return max([world, *sizes])


def prestart(spec=None, device: str = "cpu") -> None:
    """At a rank-group backend's worker start: with the Ray executor, join the cluster or start the local
    instance in the background (ray.init takes ~4 s here), overlapping the worker's imports and its first
    conversion; the first rank group then finds Ray up. Local spawn: nothing to do."""
    executor = resolve(spec)
    if executor.kind != "ray":
        return
    from .backends import ray_executor

    ray_executor.start_in_background(executor.address, group_cpus(spec), device)
