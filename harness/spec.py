"""Model spec files: pydantic models, loading with one-line errors, schema export."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import SpecError
from .spec_yaml import DuplicateKeyError, load_yaml
from .tolerances import DTYPES, KNOWN_METRICS, invalid_override

REPO_ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = REPO_ROOT / "model_specs"

TrainBackend = Literal["megatron", "deepspeed"]
InferBackend = Literal["hf", "vllm", "sglang", "lmdeploy"]
Dtype = Literal["float32", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _KeyedValueError(ValueError):
    """A validator's error about one entry below its field; parse_spec appends `subkey` to the key."""

    def __init__(self, subkey: str, message: str):
        self.subkey = subkey
        super().__init__(message)


class Layout(_Strict):
    """A parallel layout a trainer/engine backend is checked under."""

    tp: int = Field(1, ge=1, description="tensor-parallel size")
    pp: int = Field(1, ge=1, description="pipeline-parallel size")
    ep: int = Field(1, ge=1, description="expert-parallel size (MoE models; expert_tensor_parallel_size is tp "
                                         "at ep 1, megatron-core's default, and 1 at ep > 1); on a dense model "
                                         "the layout is "
                                         "not applicable")

    @property
    def id(self) -> str:
        return f"tp{self.tp}pp{self.pp}" + (f"ep{self.ep}" if self.ep > 1 else "")

    @property
    def world_size(self) -> int:
        """Ranks the layout runs: each pipeline stage holds lcm(tp, ep) ranks (data-parallel fills the rest)."""
        import math

        return self.pp * math.lcm(self.tp, self.ep)


class Reference(_Strict):
    """The HF model every parity check compares against."""

    config: dict[str, Any] = Field(default_factory=dict, description="overrides for a tiny random model")
    seed: int = Field(0, ge=0)
    path: Path | None = Field(None, description="a real local HF checkpoint (safetensors) instead of a random model")


class Converter(_Strict):
    template: str | None = Field(None, description="key given to register_template; default: hf_model_type")


class Backends(_Strict):
    train: list[TrainBackend] = Field(default_factory=list)
    infer: list[InferBackend] = Field(default_factory=lambda: ["hf"])

    @field_validator("train", "infer")
    @classmethod
    def _no_repeats(cls, names: list[str]) -> list[str]:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"backend listed twice: {', '.join(repeated)}")
        return names


class EngineOptions(_Strict):
    """How one rollout engine gets the model, the way that engine's own guide has users add one."""

    plugins: list[str] = Field(default_factory=list,
                               description="python files or modules imported only in this engine's worker "
                                           "(vLLM: ModelRegistry.register_model; lmdeploy: a ConfigBuilder subclass)")
    custom_module_map: Path | None = Field(None, description="lmdeploy: a custom_module_map file (relative to the "
                                                             "spec) mapping architectures to model classes")


class Engines(_Strict):
    vllm: EngineOptions = Field(default_factory=EngineOptions)
    sglang: EngineOptions = Field(default_factory=EngineOptions)
    lmdeploy: EngineOptions = Field(default_factory=EngineOptions)


class Rollout(_Strict):
    """The RL side of trainer<->engine parity: how sampled tokens are scored on both sides."""

    temperature: float = Field(0.7, gt=0, description="the rollout sampling temperature (checked beside 1.0)")
    engine_logprobs: Literal["processed", "raw"] = Field(
        "processed", description="what the RL stack reads from the engine: logprobs after temperature scaling "
                                 "(vLLM logprobs_mode=processed_logprobs) or the raw model logprobs")
    trainer_scales_by_temperature: bool = Field(True, description="the trainer divides logits by the temperature "
                                                                  "before log_softmax (ROLL, verl, NeMo-RL do)")
    max_new_tokens: list[int] = Field(default_factory=lambda: [8, 32], min_length=1,
                                      description="generated lengths of the parity grid")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4], min_length=1,
                                   description="samples per grid cell")
    gpu_max_new_tokens: list[int] = Field(default_factory=lambda: [128, 1024], min_length=1,
                                          description="the grid's generated lengths where the engine runs on a GPU "
                                                      "(NeMo-RL checks up to 10k; capped by max_position_embeddings)")
    gpu_batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32], min_length=1,
                                       description="the grid's samples per cell where the engine runs on a GPU")
    seed: int = Field(0, ge=0)


class Refit(_Strict):
    """Weight sync (trainer -> engine) as RL stacks do it: live trainer weights streamed in buckets."""

    bucket_bytes: int = Field(1 << 20, ge=1, description="bytes per weight-sync bucket (a tensor larger than a "
                                                         "bucket travels alone); ROLL and its peers bucket")


class DeepSpeedGrid(_Strict):
    """Which ZeRO stages and world sizes the DeepSpeed train suite runs (ROLL's strategies use them all)."""

    zero_stages: list[Literal[0, 1, 2, 3]] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1,
                                                   description="ZeRO stages of the train rows")
    world_sizes: list[Literal[1, 2]] = Field(default_factory=lambda: [1, 2], min_length=1,
                                             description="data-parallel world sizes of the train rows (a real-shape "
                                                         "model: ZeRO-0 at world size 2 holds two whole optimizer "
                                                         "states)")


class ExecutorOptions(_Strict):
    """Who starts the multi-rank backends' rank groups (--executor / CERTIFY_EXECUTOR override it)."""

    kind: Literal["local", "ray"] = Field("local", description="local: torch.multiprocessing spawn on this "
                                                               "machine; ray: one Ray actor per rank")
    ray_address: str | None = Field(None, min_length=1, description="an existing Ray cluster (HEAD:6379); "
                                                                    "omitted: a local Ray instance per worker")


class PeakRssBound(_Strict):
    """A ceiling on every backend worker's peak resident memory, scaled by the reference checkpoint's size."""

    checkpoint_factor: float = Field(3.0, gt=0, description="times the reference checkpoint's bytes (the largest "
                                                            "materialized dtype, or the real checkpoint's files)")
    extra_gib: float = Field(2.0, ge=0, description="plus this many GiB (interpreter, libraries, engine)")
    train_checkpoint_factor: float | None = Field(
        None, gt=0, description="for a worker that trained (Megatron, DeepSpeed, HF's reference step): times the "
                                "checkpoint's bytes instead; an AdamW step alone holds weights, gradients and two "
                                "moments (4 x the fp32 weights; bf16 with fp32 master weights 4.5 x). Omitted: "
                                "checkpoint_factor for every worker")


class Spec(_Strict):
    """One model's certification spec (model_specs/<name>.yaml)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="unique model name; reports/<name>/")
    hf_model_type: str = Field(min_length=1, description="model_type in the HF config.json")
    plugins: list[str] = Field(default_factory=list, description="python files (relative to the spec) or module names")
    reference: Reference = Field(default_factory=Reference)
    converter: Converter = Field(default_factory=Converter)
    backends: Backends = Field(default_factory=Backends)
    dtypes: list[Dtype] = Field(default_factory=lambda: list(DTYPES), min_length=1)
    parallel: list[Layout] = Field(default_factory=lambda: [Layout()], min_length=1)
    tolerances: dict[Dtype, dict[str, float]] = Field(default_factory=dict)
    config_waivers: dict[str, str] = Field(default_factory=dict, description="HF config key -> why it does not matter")
    engines: Engines = Field(default_factory=Engines)
    rollout: Rollout = Field(default_factory=Rollout)
    refit: Refit = Field(default_factory=Refit)
    deepspeed: DeepSpeedGrid = Field(default_factory=DeepSpeedGrid)
    executor: ExecutorOptions = Field(default_factory=ExecutorOptions)
    calibration: Path | None = Field(None, description="the checked-in calibration file (python -m harness "
                                                       "calibrate), relative to this spec; default: "
                                                       "model_specs/calibration/<name>.json when it exists")
    peak_rss_bound: PeakRssBound | None = Field(None, description="judge each worker's peak RSS (the certificate's "
                                                                  "resources) against it; omitted: measured, "
                                                                  "not judged")
    worker_timeout_s: float = Field(900.0, gt=0, description="per-request timeout of a backend worker")
    plugin_import_timeout_s: float = Field(60.0, gt=0, description="how long importing one plugin may take "
                                                                   "(pytest process and each worker)")

    _source: Path | None = PrivateAttr(None)
    _sha256: str = PrivateAttr("")
    _text: str = PrivateAttr("")  # the spec file's text, embedded in the certificate so `verify` can rebuild the plan

    @field_validator("tolerances")
    @classmethod
    def _known_metrics(cls, tolerances: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for dtype, metrics in tolerances.items():
            unknown = sorted(set(metrics) - set(KNOWN_METRICS))
            if unknown:
                raise ValueError(f"unknown metric {unknown[0]!r} for {dtype} (known: {', '.join(KNOWN_METRICS)})")
            for metric, value in metrics.items():
                why = invalid_override(metric, value)
                if why:
                    raise _KeyedValueError(f"{dtype}.{metric}", why)
        return tolerances

    @field_validator("config_waivers")
    @classmethod
    def _waivers_have_reasons(cls, waivers: dict[str, str]) -> dict[str, str]:
        for key, why in waivers.items():
            if not str(why).strip():
                raise ValueError(f"waiver for {key!r} needs a reason")
        return waivers

    @field_validator("parallel")
    @classmethod
    def _unique_layouts(cls, parallel: list[Layout]) -> list[Layout]:
        ids = [layout.id for layout in parallel]
        if len(ids) != len(set(ids)):
            raise ValueError(f"parallel layouts repeat: {ids}")
        return parallel

    @property
    def template_name(self) -> str:
        return self.converter.template or self.hf_model_type

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def sha256(self) -> str:
        return self._sha256

    @property
    def text(self) -> str:
        return self._text

    @property
    def all_backends(self) -> list[str]:
        return list(self.backends.infer) + list(self.backends.train)

    def resolve_relative(self, value: str | Path) -> Path:
        base = self._source.parent if self._source else Path.cwd()
        return (base / value).resolve()


def _loc_to_key(loc: tuple) -> str:
    key = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the dict key itself is invalid"; the key is already named
            continue
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def parse_spec(data: Any, source: Path | str | None = None) -> Spec:
    if data is None:
        raise SpecError(source, None, "spec is empty (expected a mapping with at least name and hf_model_type)")
    if not isinstance(data, dict):
        raise SpecError(source, None, f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _loc_to_key(tuple(err["loc"])) or None
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "value_error" and "error" in err.get("ctx", {}):
            message = str(err["ctx"]["error"])  # our own validators' text, without pydantic's "Value error, "
            if isinstance(err["ctx"]["error"], _KeyedValueError):
                key = f"{key}.{err['ctx']['error'].subkey}" if key else err["ctx"]["error"].subkey
        raise SpecError(source, key, message) from None
    return spec


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(path, None, "spec file does not exist") from None
    except OSError as exc:
        raise SpecError(path, None, f"cannot read spec: {exc.strerror}") from None
    try:
        data = load_yaml(raw)
    except DuplicateKeyError as exc:
        raise SpecError(path, exc.path, f"duplicate key at line {exc.line} (first at line {exc.first_line}); "
                                        f"YAML would silently keep only the last value") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise SpecError(path, where, f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    spec = parse_spec(data, path)
    spec._source = path.resolve()
    spec._sha256 = hashlib.sha256(raw).hexdigest()
    spec._text = raw.decode("utf-8", errors="replace")
    return spec


def known_model_names(specs_dir: Path = SPECS_DIR) -> list[str]:
    return sorted(p.stem for p in specs_dir.glob("*.yaml"))


def spec_path_for(name: str, specs_dir: Path = SPECS_DIR) -> Path:
    path = specs_dir / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(known_model_names(specs_dir)) or "none"
        raise SpecError("--model", name, f"unknown model (known in {specs_dir}: {known})")
    return path


def check_unique_names(specs: list[Spec]) -> None:
    seen: dict[str, Spec] = {}
    for spec in specs:
        if spec.name in seen:
            raise SpecError(spec.source, "name", f"duplicate model name {spec.name!r} (also in {seen[spec.name].source})")
        seen[spec.name] = spec


def json_schema() -> str:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Model certification spec"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
