"""Spec -> planned checks with stable ids (model/suite/backend[/variant][/dtype][/layout]).

The plan lists every check a spec implies, including those whose backend
module does not exist yet or cannot run here: the certificate reports those
as not_run with the reason instead of leaving them out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

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
    "routing": ((), ("",)),
}
# which suites each backend takes part in, and whether they run per parallel layout
BACKEND_SUITES: dict[str, tuple[str, ...]] = {
    "hf": ("hf",),
    "megatron": ("config", "roundtrip", "logits", "train", "routing"),
    "deepspeed": ("train", "logits"),
    "vllm": ("config", "registration", "logits", "refit", "rollout", "routing"),
    "sglang": ("registration", "logits", "rollout"),
    "lmdeploy": ("config", "registration", "logits"),
}
# refit: per layout, a Megatron trainer (tp x pp ranks) takes a step and syncs its live weights to the engine
PER_LAYOUT = {("megatron", "logits"), ("megatron", "train"), ("vllm", "refit"), ("megatron", "routing")}
# the trainer a suite needs in spec.backends.train: without it the suite is not planned (nothing to sync from)
SUITE_TRAINER = {"refit": "megatron"}
# suites that exist only for a mixture-of-experts model (routing agreement): not planned for a dense one
MOE_SUITES = ("routing",)
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")
# backend-specific dtype-dependent variants replacing the suite's default ones
BACKEND_VARIANTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("deepspeed", "logits"): ("zero3-infer",),
}


def deepspeed_train_variants(spec: Spec) -> tuple[str, ...]:
    """zero<stage>-ws<world> for the spec's DeepSpeed grid (all stages at world sizes 1 and 2 by default)."""
    return tuple(f"zero{stage}-ws{world}" for stage in sorted(set(spec.deepspeed.zero_stages))
                 for world in sorted(set(spec.deepspeed.world_sizes)))


@dataclass(frozen=True)
class PlannedCheck:
    model: str
    suite: str
    backend: str
    variant: str = ""
    dtype: str = ""
    layout: str = ""
    # why this layout cannot exist for this model (expert parallelism on a dense model); not part of the id
    layout_not_applicable: str = field(default="", compare=False)

    @property
    def scope(self) -> str:
        """'gpu' when the backend needs CUDA for this suite by design, else 'cpu' (declared by the backend)."""
        cls = _backend_class(self.backend)
        return cls.scope(self.suite) if cls is not None else "cpu"

    @property
    def not_applicable(self) -> str:
        """Why this combination cannot exist by design ('' when it can): the layout's or the backend's reason."""
        if self.layout_not_applicable:
            return self.layout_not_applicable
        cls = _backend_class(self.backend)
        return cls.not_applicable_dtypes.get(self.dtype, "") if cls is not None else ""

    @property
    def id(self) -> str:
        parts = [self.model, self.suite, self.backend, self.variant, self.dtype, self.layout]
        return "/".join(p for p in parts if p)

    @property
    def short_id(self) -> str:
        """The id without the model, for pytest node ids under a model."""
        return self.id.split("/", 1)[1]


def _backend_class(name: str):
    from .backends import backend_class  # backend modules import only their base at module level: cheap

    return backend_class(name)


# Rollout scorers are planned only where they differ from HF's: Megatron-core is its own implementation.
# DeepSpeed's deepspeed_infer runs the HF module itself; from a ZeRO-3 engine sharded over 2 ranks (each
# scoring its own rows) its log-probs equal the HF scorer's bit for bit in fp32 and bf16 (measured), so a
# DeepSpeed-scored rollout row would repeat the HF-scored one. logits/deepspeed/zero3-infer covers ZeRO-3.
SAME_AS_HF_SCORER = {"deepspeed": "deepspeed_infer runs the HF module: ZeRO-3 at world size 2 scores "
                                  "bit-identically to the HF scorer"}


def rollout_scorers(spec: Spec) -> tuple[str, ...]:
    """Who scores the engine's samples: HF, and each train backend whose scoring differs from HF's."""
    return ("hf", *(t for t in spec.backends.train if t not in SAME_AS_HF_SCORER))


def rollout_variants(spec: Spec) -> tuple[str, ...]:
    """scorer-T<temperature>: who scores the engine's samples, at temperature 1 and the rollout one."""
    temperatures = sorted({1.0, spec.rollout.temperature})
    return tuple(f"{scorer}-t{t:g}" for scorer in rollout_scorers(spec) for t in temperatures)


def parse_rollout_variant(variant: str) -> tuple[str, float]:
    trainer, _, temperature = variant.rpartition("-t")
    return trainer, float(temperature)


def ranks_needed(check: PlannedCheck, spec: Spec) -> int:
    """How many ranks (on cuda: GPUs, one each) a check's measurement runs: tp*pp at a Megatron layout
    (refit's trainer too), the world size of a DeepSpeed case, the first layout for a Megatron-scored
    rollout, else 1 (a single-process worker)."""
    if check.layout:
        layout = next((lay for lay in spec.parallel if lay.id == check.layout), None)
        return layout.world_size if layout is not None else 1
    if check.backend == "deepspeed" and "-ws" in check.variant:
        return int(check.variant.rpartition("-ws")[2])
    if check.suite == "rollout" and parse_rollout_variant(check.variant)[0] == "megatron" and spec.parallel:
        return spec.parallel[0].world_size
    return 1


# where HF configs keep the number of routed experts (qwen2_moe/qwen3_moe, mixtral, deepseek, ...)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_count(spec: Spec) -> int | None:
    """Routed experts of the spec's reference model (0: dense), None when it cannot be told here.

    Read from the reference overrides, a real checkpoint's config.json, else the model type's
    transformers defaults (imported only for specs with an ep > 1 layout)."""
    config = dict(spec.reference.config)
    if spec.reference.path is not None:
        path = spec.resolve_relative(spec.reference.path) / "config.json"
        try:
            config = {**json.loads(path.read_text()), **config}
        except (OSError, ValueError):
            pass
    for key in EXPERT_COUNT_KEYS:
        if key in config:
            return int(config[key] or 0)
    try:
        from transformers import AutoConfig

        defaults = AutoConfig.for_model(spec.hf_model_type)
    except Exception:  # noqa: BLE001 - an unknown (plugin-registered) model type: let the backend decide
        return None
    return next((int(getattr(defaults, k) or 0) for k in EXPERT_COUNT_KEYS if hasattr(defaults, k)), 0)


def layout_reasons(spec: Spec) -> dict[str, str]:
    """layout id -> why it is not applicable to this model (expert parallelism on a dense model)."""
    with_ep = [lay for lay in spec.parallel if lay.ep > 1]
    if not with_ep or expert_count(spec) != 0:
        return {}
    return {lay.id: f"expert parallelism (ep {lay.ep}) needs a MoE model; {spec.hf_model_type} has no experts"
            for lay in with_ep}


def is_moe(spec: Spec) -> bool:
    """An expert count in the reference config (overrides, else a real checkpoint's config.json) decides;
    without one, the model type's default config (the MoE families the harness knows are MoE)."""
    import json

    config = dict(spec.reference.config)
    if spec.reference.path is not None and not any(k in config for k in EXPERT_COUNT_KEYS):
        try:
            config = {**json.loads((spec.resolve_relative(spec.reference.path) / "config.json").read_text()), **config}
        except (OSError, ValueError):
            pass  # spec validation names an unreadable checkpoint; planning does not
    counts = [config[k] for k in EXPERT_COUNT_KEYS if config.get(k) is not None]
    return bool(counts[0]) if counts else spec.hf_model_type in MOE_MODEL_TYPES


def build_plan(spec: Spec, backends: list[str] | None = None, dtypes: list[str] | None = None) -> list[PlannedCheck]:
    chosen_dtypes = [d for d in spec.dtypes if not dtypes or d in dtypes]
    plan: list[PlannedCheck] = []
    reasons = layout_reasons(spec)
    for backend in spec.all_backends:
        if backends and backend not in backends:
            continue
        for suite in BACKEND_SUITES[backend]:
            if suite in SUITE_TRAINER and SUITE_TRAINER[suite] not in spec.backends.train:
                continue
            if suite in MOE_SUITES and not is_moe(spec):
                continue
            agnostic, per_dtype = SUITE_VARIANTS[suite]
            per_dtype = BACKEND_VARIANTS.get((backend, suite), per_dtype)
            if suite == "rollout":
                per_dtype = rollout_variants(spec)
            elif (backend, suite) == ("deepspeed", "train"):
                per_dtype = deepspeed_train_variants(spec)
            layouts = [lay.id for lay in spec.parallel] if (backend, suite) in PER_LAYOUT else [""]
            for variant in agnostic:
                plan.append(PlannedCheck(spec.name, suite, backend, variant))
            for variant in per_dtype:
                for dtype in chosen_dtypes:
                    for layout in layouts:
                        plan.append(PlannedCheck(spec.name, suite, backend, variant, dtype, layout,
                                                 reasons.get(layout, "")))
    return plan
