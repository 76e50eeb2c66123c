"""One rank of a DeepSpeed case (spawned by the DeepSpeed backend; gloo on CPU, NCCL + one GPU per rank on cuda)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


LIVE_LAYERS = 2  # ZeRO-3: about this many decoder layers' parameters gathered at once (~16 h^2 elements a layer)


def _config(stage: int, dtype: str, hidden_size: int) -> dict:
    from ..train_step import OPTIMIZER

    # the bucket sizes transformers' DeepSpeed integration gives "auto" (HfTrainerDeepSpeedConfig), which ROLL's
    # strategy configs use; DeepSpeed's own defaults (5e8 elements: 2 GB fp32 buffers per rank) do not fit a real
    # shape beside two ranks on 24 GiB. Bucketing groups the reductions; each element's sum is the same.
    # memory_efficient_linear stays DeepSpeed's default (on), as ROLL's ZeRO-3 configs leave it: ZeRO-3 then runs
    # F.linear through its own autograd function, which saves the parameter rather than a view of the gathered
    # weight, so a layer's gathered weights are released after its forward (off: the whole model stays gathered
    # on every rank until the backward, +1.8 GiB a rank at Qwen2.5-0.5B's shape)
    zero = {"stage": stage, "reduce_bucket_size": hidden_size * hidden_size}
    if stage == 3:
        live = LIVE_LAYERS * 16 * hidden_size * hidden_size
        # max live / reuse distance: DeepSpeed's 1e9 elements keep every gathered parameter of a model under 1e9
        # through the backward (the whole model again on each rank); a few layers' worth is released after use and
        # gathered again. sub_group_size: the optimizer steps its fp32 partition in groups of this many elements;
        # torch's AdamW makes two temporaries the size of a group (DeepSpeed's 1e9: the whole partition, +2.8 GiB a
        # rank at 0.5B). Where a parameter lives, or which group steps it, changes no value it takes (Adam is
        # elementwise; no clipping).
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                    stage3_param_persistence_threshold=10 * hidden_size,
                    stage3_max_live_parameters=live, stage3_max_reuse_distance=live, sub_group_size=live)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {**OPTIMIZER, "betas": list(OPTIMIZER["betas"]), "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "gradient_clipping": 0.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


# ---- seams: the trainer-side steps ROLL's deepspeed strategy performs, one function each ----
def provide_model(directory: str):
    """ROLL's model provider: AutoModelForCausalLM.from_pretrained, trainable in fp32 master weights."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def trainer_batch(sequences: list[list[int]]):
    from ..train_step import make_batch

    return make_batch(sequences)


def rank_loss(loss_sum, total: int, world: int):
    """DeepSpeed averages gradients over ranks: scale so the average is d(global token mean)."""
    return loss_sum / total * world


def run_rank(rank: int, world: int, port: int, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    if job.get("spec_path"):
        # the user's plugins (model classes registered with AutoModelForCausalLM) must exist in every rank
        from ..spec import load_spec
        from ..spec_plugins import import_spec_plugins

        import_spec_plugins(load_spec(job["spec_path"]))
    from .deepspeed import accelerator_for
    from .rank_setup import init_rank

    device = job.get("device", "cpu")
    os.environ["DS_ACCELERATOR"] = accelerator_for(device)  # read when deepspeed is first imported

    def init_distributed(backend: str) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)  # reads RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*

    init_rank(rank, world, port, device, init=init_distributed)
    import deepspeed
    import torch
    import torch.distributed as dist

    model = provide_model(job["dir"])
    engine, *_ = deepspeed.initialize(model=model, config=_config(job["stage"], job["dtype"],
                                                                  int(model.config.hidden_size)),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    if job["mode"] == "train":
        _train(engine, job, rank, world, torch, dist)
    elif job["mode"] == "capture":
        _capture(engine, job, rank, torch)
    else:
        _infer(engine, job, rank, world, torch, dist)
    dist.barrier()


def _train(engine, job, rank, world, torch, dist) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from safetensors.torch import save_file

    from ..capture import routing_capture
    from ..train_step import IGNORE, StreamSpill, loss_sum_and_count, moe_layer_ids, routing_key

    batch = trainer_batch(job["sequences"])
    total = int((batch["labels"] != IGNORE).sum())
    mine = _placed({k: v[rank::world] for k, v in batch.items()}, engine)  # this data-parallel rank's rows
    losses, warmup, routed = [], 0, {}
    out = Path(job["out_dir"])
    # the full shape of every parameter (ZeRO-3 keeps a partition in .data; ds_shape is the whole)
    shapes = {name: tuple(getattr(param, "ds_shape", param.shape)) for name, param in engine.module.named_parameters()}

    def spill(kind: str):
        """Rank 0 writes each gathered parameter at once (checkpoint names: per-expert MoE tensors, as the
        reference and Megatron report them); the other ranks only take part in the collective gathers. Whole-model
        copies, held on every rank through the later steps, were 2 x the model per rank at a real shape; one
        gathered on rank 0 before writing, 1 x more there."""
        return StreamSpill(job["out_dir"], kind, engine.module, shapes) if rank == 0 else None

    moe = bool(moe_layer_ids(engine.module))
    for step in range(job["steps"]):
        store: dict = {}
        with routing_capture(engine.module, store) if moe else contextlib.nullcontext():
            logits = engine(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"]).logits
        routed.update((routing_key(step, key), tensor) for key, tensor in store.items())
        loss_sum, _ = loss_sum_and_count(logits, mine["labels"])
        engine.backward(rank_loss(loss_sum, total, world))
        reported = loss_sum.detach().clone()
        dist.all_reduce(reported)
        losses.append(float(reported) / total)
        if step == 0:  # written before the step changes them: no copies kept
            grads = spill("grads")
            for name, param in engine.module.named_parameters():
                grad = safe_get_full_grad(param)  # collective under ZeRO-3: every rank calls it
                if grad is not None and grads is not None:
                    grads.write(name, grad)
            if grads is not None:
                grads.close()
        engine.step()
        if step == 0:
            warmup = _optimizer_steps(engine) - 1
            weights, unfused = spill("weights"), _unfused_masters(engine)
            for name, param in engine.module.named_parameters():
                full = safe_get_full_fp32_param(param)  # None for plain ZeRO-0 fp32: the param is the master copy
                full = unfused.get(id(param)) if full is None else full
                if weights is not None:
                    weights.write(name, param if full is None else full)
            if weights is not None:
                weights.close()
    routing = _rows_in_order(routed, rank, world, len(batch["input_ids"]), dist) if moe else None
    if rank == 0:
        extra = {}
        if routing:  # the router's decisions at every step, which a bf16 reference replays
            save_file(routing, str(out / "routing.safetensors"))
            extra["routing"] = str(out / "routing.safetensors")
        (out / "result.json").write_text(json.dumps({"losses": losses, "grads": str(out / "grads.safetensors"),
                                                     "weights": str(out / "weights.safetensors"),
                                                     "optimizer_warmup_steps": warmup, **extra}))


def _rows_in_order(tensors: dict, rank: int, world: int, rows: int, dist) -> dict | None:
    """Every rank's [own rows, S, *] tensors (rank r holds rows r, r + world, ...) as whole-batch tensors on
    rank 0 (None elsewhere)."""
    import torch

    parts = [None] * world if rank == 0 else None
    dist.gather_object(tensors, parts, dst=0)
    if rank != 0:
        return None
    out = {}
    for key, first in parts[0].items():
        whole = first.new_zeros((rows, *first.shape[1:]))
        for r, part in enumerate(parts):
            whole[torch.arange(r, rows, world)] = part[key]
        out[key] = whole
    return out


def _placed(batch: dict, engine) -> dict:
    """The batch on the engine's device (unchanged on cpu)."""
    device = getattr(engine, "device", None)
    if device is None or str(device) == "cpu":
        return batch
    return {k: v.to(device) for k, v in batch.items()}


def _unfused_masters(engine) -> dict:
    """id(model parameter) -> the fp32 master weight FP16_UnfusedOptimizer keeps for it.

    deepspeed 0.19.8 ZeRO-0 + bf16 updates fp32 copies (fp32_groups, cloned from the bf16 module) and
    copies them back into the bf16 parameters; safe_get_full_fp32_param does not know them (None),
    and the bf16 parameter would show the master's update rounded to bf16."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        return {}
    return {id(low): high for lows, highs in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
            for low, high in zip(lows, highs)}


def _optimizer_steps(engine) -> int:
    """Adam's own step counter after the first engine step (1 unless the optimizer warmed up by itself).

    deepspeed 0.19.8 ZeRO-0 + bf16 wraps AdamW in FP16_UnfusedOptimizer, whose
    initialize_optimizer_states() takes one zero-gradient step first: the counter reads 2.
    """
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    counters = [int(state["step"]) for state in inner.state.values() if "step" in state]
    return max(counters, default=1)


def _infer(engine, job, rank, world, torch, dist) -> None:
    """deepspeed_infer: every data-parallel rank scores its own rows of each prompt set through the
    (ZeRO-3: sharded, gathered per module on the fly) engine; rank 0 puts the rows back in order."""
    from safetensors.torch import save_file

    from ..train_step import make_batch

    engine.eval()
    outputs = {}
    with torch.no_grad():
        for name, seqs in job["prompts"].items():
            batch = make_batch(seqs)  # the global padding, so every rank's rows have the same length
            rows = list(range(rank, len(seqs), world))
            # ZeRO-3 gathers parameters collectively: a rank without rows still runs (row 0) and drops it
            mine = _placed({k: v[rows or [0]] for k, v in batch.items()}, engine)
            logits = engine(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"]).logits
            part = torch.log_softmax(logits.float(), dim=-1).cpu().contiguous() if rows else None
            parts = [None] * world if rank == 0 else None
            dist.gather_object((rows, part), parts, dst=0)
            if rank == 0:
                full = torch.empty(len(seqs), *logits.shape[1:], dtype=torch.float32)
                for got_rows, got in parts:
                    if got_rows:
                        full[got_rows] = got
                outputs[name] = full.contiguous()
    if rank == 0:
        Path(job["out_dir"]).mkdir(parents=True, exist_ok=True)
        save_file(outputs, f"{job['out_dir']}/logprobs.safetensors")


def _capture(engine, job, rank, torch) -> None:
    """Divergence localization: the HF module's activation points (harness.capture) inside the engine.
    Every rank runs the whole batch (ZeRO-3 gathers parameters collectively); rank 0 writes them."""
    from safetensors.torch import save_file

    from ..capture import hf_capture
    from ..train_step import make_batch

    engine.eval()
    store: dict = {}
    batch = _placed(make_batch(job["sequences"]), engine)
    with torch.no_grad(), hf_capture(engine.module, store):
        engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if rank == 0:
        Path(job["out_path"]).parent.mkdir(parents=True, exist_ok=True)
        save_file(store, job["out_path"])
