"""Spec -> planned checks with stable ids (model/suite/backend[/variant][/dtype][/layout]).

The plan lists every check a spec implies, including those whose backend
module does not exist yet or cannot run here: the certificate reports those
as not_run with the reason instead of leaving them out.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import Spec

# suite -> variants that do not depend on dtype, and those that do
SUITE_VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "config": (("",), ()),
    "roundtrip": (("consumption", "names-shapes"), ("bit-exact",)),
    "hf": ((), ("load", "save-load")),
    "logits": ((), ("",)),
    "train": ((), ("",)),
    "registration": (("",), ()),
    "refit": ((), ("",)),
    "rollout": ((), ("",)),
}
# which suites each backend takes part in, and whether they run per parallel layout
BACKEND_SUITES: dict[str, tuple[str, ...]] = {
    "hf": ("hf",),
    "megatron": ("config", "roundtrip", "logits", "train"),
    "deepspeed": ("train", "logits"),
    "vllm": ("config", "registration", "logits", "refit", "rollout"),
    "sglang": ("registration", "logits", "rollout"),
    "lmdeploy": ("config", "registration", "logits"),
}
# refit: the trainer-side weights are sharded per layout before the reverse conversion gathers them
PER_LAYOUT = {("megatron", "logits"), ("megatron", "train"), ("vllm", "refit")}
# backend-specific dtype-dependent variants replacing the suite's default ones
BACKEND_VARIANTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("deepspeed", "train"): tuple(f"zero{stage}-ws{world}" for stage in range(4) for world in (1, 2)),
    ("deepspeed", "logits"): ("zero3-infer",),
}


@dataclass(frozen=True)
class PlannedCheck:
    model: str
    suite: str
    backend: str
    variant: str = ""
    dtype: str = ""
    layout: str = ""

    @property
    def id(self) -> str:
        parts = [self.model, self.suite, self.backend, self.variant, self.dtype, self.layout]
        return "/".join(p for p in parts if p)

    @property
    def short_id(self) -> str:
        """The id without the model, for pytest node ids under a model."""
        return self.id.split("/", 1)[1]


def rollout_variants(spec: Spec) -> tuple[str, ...]:
    """trainer-T<temperature>: who scores the engine's samples, at temperature 1 and the rollout one."""
    temperatures = sorted({1.0, spec.rollout.temperature})
    trainers = ["hf", *spec.backends.train]
    return tuple(f"{trainer}-t{t:g}" for trainer in trainers for t in temperatures)


def parse_rollout_variant(variant: str) -> tuple[str, float]:
    trainer, _, temperature = variant.rpartition("-t")
    return trainer, float(temperature)


def build_plan(spec: Spec, backends: list[str] | None = None, dtypes: list[str] | None = None) -> list[PlannedCheck]:
    chosen_dtypes = [d for d in spec.dtypes if not dtypes or d in dtypes]
    plan: list[PlannedCheck] = []
    for backend in spec.all_backends:
        if backends and backend not in backends:
            continue
        for suite in BACKEND_SUITES[backend]:
            agnostic, per_dtype = SUITE_VARIANTS[suite]
            per_dtype = BACKEND_VARIANTS.get((backend, suite), per_dtype)
            if suite == "rollout":
                per_dtype = rollout_variants(spec)
            layouts = [lay.id for lay in spec.parallel] if (backend, suite) in PER_LAYOUT else [""]
            for variant in agnostic:
                plan.append(PlannedCheck(spec.name, suite, backend, variant))
            for variant in per_dtype:
                for dtype in chosen_dtypes:
                    for layout in layouts:
                        plan.append(PlannedCheck(spec.name, suite, backend, variant, dtype, layout))
    return plan
