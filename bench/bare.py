"""Bare baseline: replay a harness call log (CERTIFY_CALL_LOG) with plain torch / transformers / safetensors /
megatron.core / deepspeed code, none of harness/, suites/ or fixtures/ imported.

    .venv/bin/python bench/bare.py CALLS.jsonl --out RESULT.json [--backends hf,megatron,deepspeed] [--work DIR]

Every logged call of the chosen backends whose status is "ok" is replayed in log order, doing the computation and
the output writes of the harness op (same forwards over the same right-padded prompts, same train steps, optimizer
and recipe, same tensors saved) without its judging, conversion bookkeeping or reports. The process structure is the
harness's: one long-lived fresh Python process per backend, started on its first call (its start counted, as the
harness counts its worker's), talking JSON lines; the hf process keeps each loaded eval model; each Megatron call
spawns tp*pp ranks and each DeepSpeed case `world` ranks with torch.multiprocessing (spawn, gloo on the CPU).
Outputs go under --work (default: a temporary folder, removed at the end) at the logged paths.
Supported: dense qwen2 / llama-style models (q/k/v bias optional, SwiGLU, RMSNorm, RoPE, tied or untied head).
hf.materialize is not replayed (the checkpoint is already cached); vLLM/sglang/lmdeploy are bench/engines.py's.
RESULT.json: wall_s; per backend start_s and busy_s (counted as the harness counts them: every call, the worker's
start inside its first) and calls; per call bare_s beside the logged harness_s; skipped calls and why; `sanity`
(untimed): bare Megatron/DeepSpeed fp32 log-probs vs transformers, bare trainers' grads/weights vs the bare reference.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

OPTIMIZER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}  # the harness's recipe
IGNORE, PROMPT_TOKENS, MICROBATCHES = -100, 2, 2
EMB, HEAD = "embedding.word_embeddings.weight", "output_layer.weight"
SHOWN = ("dtype", "dtypes", "tp", "pp", "stage", "world", "steps", "attention", "compute_dtype")


# ---------------------------------------------------------------- batch and scoring (every backend's)
def make_batch(seqs):
    """Right-padded ids, mask and next-token labels (padding and the first PROMPT_TOKENS positions masked)."""
    import torch

    n_max = max(map(len, seqs))
    ids, mask = torch.zeros(len(seqs), n_max, dtype=torch.long), torch.zeros(len(seqs), n_max, dtype=torch.long)
    labels = torch.full((len(seqs), n_max), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        labels[i, :len(s) - 1] = torch.tensor(s[1:])
        labels[i, :min(PROMPT_TOKENS, len(s) - 1)] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def score(logits, ids, realized):
    """Full-vocab log_softmax [b, s, v], or with `realized` each next token's log-prob [b, s] float64 (NaN last)."""
    import torch

    if not realized:
        return torch.log_softmax(logits.float(), dim=-1).cpu().contiguous()
    out = torch.full(ids.shape, float("nan"), dtype=torch.float64)
    for i in range(ids.shape[0]):
        rows = torch.log_softmax(logits[i, :-1].float(), dim=-1).double()
        if realized["scales"]:
            rows = torch.log_softmax(rows / realized["temperature"], dim=-1)
        out[i, :-1] = rows.gather(-1, ids[i, 1:].long().cpu()[:, None]).squeeze(-1)
    return out


def save(tensors, path, metadata=None):
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


# ---------------------------------------------------------------- HF <-> Megatron (local spec) for dense models
def read_config(directory):
    """The few numbers conversion and TransformerConfig need, from config.json."""
    c = json.loads((Path(directory) / "config.json").read_text())
    if c.get("mlp_bias") or c.get("use_sliding_window") or c.get("num_experts") or c.get("num_local_experts"):
        raise ValueError("bare.py covers dense models without MLP bias or sliding windows only")
    heads = c["num_attention_heads"]
    rope = c.get("rope_parameters") or {}
    return {"hidden": c["hidden_size"], "ffn": c["intermediate_size"], "layers": c["num_hidden_layers"],
            "heads": heads, "groups": c.get("num_key_value_heads") or heads,
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads, "eps": c["rms_norm_eps"],
            "vocab": c["vocab_size"], "max_pos": c["max_position_embeddings"],
            "rope_base": rope.get("rope_theta", c.get("rope_theta", 10000)),
            "qkv_bias": c["model_type"] == "qwen2" or bool(c.get("attention_bias")),
            "tied": bool(c.get("tie_word_embeddings")), "attention_dropout": c.get("attention_dropout", 0.0)}


def hf_to_mca(hf, cfg):
    """HF names -> megatron-core local-spec names: linear_qkv interleaved per query group, linear_fc1 = [gate; up]."""
    import torch

    src, g = dict(hf), cfg["groups"]
    out = {EMB: src.pop("model.embed_tokens.weight"), "decoder.final_layernorm.weight": src.pop("model.norm.weight")}
    if "lm_head.weight" in src:
        out[HEAD] = src.pop("lm_head.weight")
    for i in range(cfg["layers"]):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = src.pop(h + "input_layernorm.weight")
        for kind in ("weight", "bias") if cfg["qkv_bias"] else ("weight",):
            q, k, v = (src.pop(f"{h}self_attn.{x}_proj.{kind}") for x in "qkv")
            rest = q.shape[1:]
            out[f"{m}self_attention.linear_qkv.{kind}"] = torch.cat(
                [q.reshape(g, -1, *rest), k.reshape(g, -1, *rest), v.reshape(g, -1, *rest)], 1).reshape(-1, *rest)
        out[m + "self_attention.linear_proj.weight"] = src.pop(h + "self_attn.o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = src.pop(h + "post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([src.pop(h + "mlp.gate_proj.weight"), src.pop(h + "mlp.up_proj.weight")])
        out[m + "mlp.linear_fc2.weight"] = src.pop(h + "mlp.down_proj.weight")
    if src:
        raise ValueError(f"HF tensors bare.py does not convert: {sorted(src)[:3]}")
    return out


def mca_to_hf(mca, cfg):
    """The inverse of hf_to_mca."""
    import torch

    src, g, hd = dict(mca), cfg["groups"], cfg["head_dim"]
    per_q = cfg["heads"] // g * hd
    out = {"model.embed_tokens.weight": src.pop(EMB), "model.norm.weight": src.pop("decoder.final_layernorm.weight")}
    if HEAD in src:
        out["lm_head.weight"] = src.pop(HEAD)
    for i in range(cfg["layers"]):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[h + "input_layernorm.weight"] = src.pop(m + "input_layernorm.weight")
        for kind in ("weight", "bias") if cfg["qkv_bias"] else ("weight",):
            fused = src.pop(f"{m}self_attention.linear_qkv.{kind}")
            rest = fused.shape[1:]
            parts = torch.split(fused.reshape(g, per_q + 2 * hd, *rest), [per_q, hd, hd], dim=1)
            out.update((f"{h}self_attn.{x}_proj.{kind}", t.reshape(-1, *rest)) for x, t in zip("qkv", parts))
        out[h + "self_attn.o_proj.weight"] = src.pop(m + "self_attention.linear_proj.weight")
        out[h + "post_attention_layernorm.weight"] = src.pop(m + "pre_mlp_layernorm.weight")
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = src.pop(m + "mlp.linear_fc1.weight").chunk(2)
        out[h + "mlp.down_proj.weight"] = src.pop(m + "mlp.linear_fc2.weight")
    if src:
        raise ValueError(f"Megatron tensors bare.py does not convert: {sorted(src)[:3]}")
    return out


def split_rule(name):
    """(TP split dim or None = duplicated, parts split separately): column dim 0, row dim 1, fc1 per [gate; up]."""
    if name.endswith("linear_fc1.weight"):
        return 0, 2
    if name in (EMB, HEAD) or ".linear_qkv." in name:
        return 0, 1
    return (1, 1) if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else (None, 1)


def shard(mca, tp, pp, cfg):
    """Whole Megatron state -> {(pp rank, tp rank): the stage's local state}; layers renumbered per stage, the
    embedding on the first stage, final norm and head on the last (tied with pp > 1: a head copy there)."""
    import torch

    per, out = cfg["layers"] // pp, {(p, t): {} for p in range(pp) for t in range(tp)}
    for name, tensor in mca.items():
        dim, parts = split_rule(name)
        if dim is None or tp == 1:
            pieces = [tensor] * tp
        else:
            chunks = [c.chunk(tp, dim) for c in tensor.chunk(parts, dim)]
            pieces = [torch.cat([c[r] for c in chunks], dim) for r in range(tp)]
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            stages = [(int(m[1]) // per, f"decoder.layers.{int(m[1]) % per}.{m[2]}")]
        elif name == EMB:
            stages = [(0, name)] + ([(pp - 1, HEAD)] if cfg["tied"] and pp > 1 else [])
        else:
            stages = [(pp - 1, name)]
        for p, local in stages:
            for t, piece in enumerate(pieces):
                out[(p, t)][local] = piece.contiguous()
    return out


def gather(shards, tp, pp, cfg):
    """The inverse of shard (the last stage's copy of a tied embedding dropped)."""
    import torch

    per, whole = cfg["layers"] // pp, {}
    for p in range(pp):
        for local in shards[(p, 0)]:
            if cfg["tied"] and pp > 1 and p == pp - 1 and local == HEAD:
                continue
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)", local)
            name = f"decoder.layers.{int(m[1]) + p * per}.{m[2]}" if m else local
            dim, parts = split_rule(name)
            pieces = [shards[(p, t)][local] for t in range(tp)]
            if dim is None or tp == 1:
                whole[name] = pieces[0]
            else:
                by_rank = [s.chunk(parts, dim) for s in pieces]
                whole[name] = torch.cat([torch.cat([r[k] for r in by_rank], dim) for k in range(parts)], dim)
    return whole


# ---------------------------------------------------------------- hf backend (one process, eval models cached)
_EVAL = {}


def hf_model(directory, dtype, attention=None, cached=True):
    import torch
    from transformers import AutoModelForCausalLM

    key = (directory, dtype, attention)
    if key not in _EVAL or not cached:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
        if attention:
            model.set_attn_implementation(attention)
        if not cached:
            return model
        _EVAL[key] = model.eval()
    return _EVAL[key]


def hf_load(dir, dtype, **_):
    """from_pretrained in the dtype, as the ROLL model providers load it (a fresh load: the check is the load)."""
    hf_model(dir, dtype, cached=False)
    return {}


def hf_save_load(dir, dtype, **_):
    """save_pretrained + from_pretrained back; the state dicts compared bit-exact."""
    import torch

    first = hf_model(dir, dtype, cached=False)
    with tempfile.TemporaryDirectory(prefix="bare-hf-") as tmp:
        first.save_pretrained(tmp, safe_serialization=True)
        second = hf_model(tmp, dtype, cached=False)
    a, b = first.state_dict(), second.state_dict()
    return {"differing": sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))}


def hf_logprobs(dir, dtype, prompts, out_path, attention=None, realized=None, **_):
    """One right-padded forward per prompt set; full-vocab log-probs (or realized next-token ones) saved."""
    import torch

    model, out = hf_model(dir, dtype, attention), {}
    with torch.no_grad():
        for name, seqs in prompts.items():
            batch = make_batch(seqs)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out[name] = score(logits, batch["input_ids"], realized)
    save(out, out_path)
    return {}


def hf_greedy_reference(dir, dtype, prompts, max_new_tokens, out_path, attention=None, **_):
    """Greedy continuation without KV cache (every step recomputed), then log-probs along prompt + continuation."""
    import torch

    model, tensors = hf_model(dir, dtype, attention), {}
    with torch.no_grad():
        for name, seqs in prompts.items():
            for i, seq in enumerate(seqs):
                tokens = list(seq)
                for _ in range(max_new_tokens):
                    tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].float().argmax()))
                logits = model(input_ids=torch.tensor([tokens])).logits[0]
                tensors[f"{name}/{i}"] = torch.log_softmax(logits.float(), dim=-1).contiguous()
                tensors[f"{name}/{i}/generated"] = torch.tensor(tokens[len(seq):], dtype=torch.int64)
    save(tensors, out_path)
    return {}


def hf_train_reference(dir, dtype, sequences, out_dir, steps, warmup_zero_steps=0, compute_dtype=None,
                       routing=None, attention=None, **_):
    """Plain-torch AdamW on the fp32 master; bf16: master takes the bf16-rounded weights, each step runs forward and
    backward on a bf16 (compute_dtype) copy and hands its gradients to AdamW as fp32. Saves step-0 grads and the
    weights after the first step."""
    import copy

    import torch
    import torch.nn.functional as F

    if routing:
        raise ValueError("MoE routing replay is not covered by bare.py")
    model = hf_model(dir, "float32", attention, cached=False).train()
    low, compute_t = getattr(torch, dtype), getattr(torch, compute_dtype or dtype)
    master = dict(model.named_parameters())
    with torch.no_grad():
        for p in master.values():
            p.copy_(p.to(low))
    compute = model if low == compute_t == torch.float32 else copy.deepcopy(model)
    for p in compute.parameters() if compute is not model else ():
        p.data = p.data.to(compute_t)
    params = dict(compute.named_parameters())
    opt = torch.optim.AdamW(master.values(), **OPTIMIZER)
    for _ in range(warmup_zero_steps):
        for p in master.values():
            p.grad = torch.zeros_like(p)
        opt.step()
    batch = make_batch(sequences)
    total = int((batch["labels"] != IGNORE).sum())
    losses, grads, weights = [], {}, {}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if compute is not model:
            compute.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(master[n].to(low))
        logits = compute(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE, reduction="sum") / total
        loss.backward()
        losses.append(float(loss))
        if compute is not model:
            for n, p in params.items():
                master[n].grad = None if p.grad is None else p.grad.detach().float()
        if step == 0:
            grads = {n: p.grad.detach().float().clone() for n, p in master.items() if p.grad is not None}
        opt.step()
        if step == 0:
            weights = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    save(grads, f"{out_dir}/grads.safetensors")
    save(weights, f"{out_dir}/weights.safetensors")
    return {"losses": losses}


# ---------------------------------------------------------------- megatron backend: the parent side
def mcore_config(cfg, dtype="float32", tp=1, pp=1, attention_dropout=0.0):
    """megatron-core's TransformerConfig for the model, CPU-safe (no fusions, CPU initialisation, no dropout)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        hidden_size=cfg["hidden"], ffn_hidden_size=cfg["ffn"], num_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_query_groups=cfg["groups"], kv_channels=cfg["head_dim"],
        layernorm_epsilon=cfg["eps"], normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=cfg["qkv_bias"],
        gated_linear_unit=True, activation_func=F.silu, hidden_dropout=0.0, attention_dropout=attention_dropout,
        params_dtype=getattr(torch, dtype), pipeline_dtype=getattr(torch, dtype), tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, expert_tensor_parallel_size=tp, use_cpu_initialization=True,
        perform_initialization=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, cross_entropy_loss_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False)


def megatron_config(dir, **_):
    """The TransformerConfig built (what the config check reads)."""
    cfg = read_config(dir)
    mcore_config(cfg, attention_dropout=cfg["attention_dropout"])
    return {}


def megatron_roundtrip(dir, **_):
    """HF -> Megatron -> HF, every tensor compared bit-exact."""
    import torch
    from safetensors.torch import load_file

    cfg, hf = read_config(dir), {}
    for f in sorted(Path(dir).glob("*.safetensors")):
        hf.update(load_file(str(f)))
    back = mca_to_hf(hf_to_mca(hf, cfg), cfg)
    return {"differing": sorted(k for k in hf if k not in back or not torch.equal(hf[k], back[k]))}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, job):
    """`fn(rank, world, port, job)` in `world` fresh processes (spawn), retried on a port taken meanwhile."""
    import torch.multiprocessing as mp

    for attempt in range(3):
        try:
            return mp.start_processes(fn, args=(world, free_port(), job), nprocs=world, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            if "EADDRINUSE" not in str(exc) or attempt == 2:
                raise


def megatron_job(dir, tp, pp, job, ep=1, **_):
    """Convert + shard the checkpoint into a temp folder and run tp*pp Megatron ranks on `job`; returns cfg."""
    from safetensors.torch import load_file

    if ep != 1:
        raise ValueError("expert parallelism is not covered by bare.py")
    cfg, hf = read_config(dir), {}
    for f in sorted(Path(dir).glob("*.safetensors")):
        hf.update(load_file(str(f)))
    with tempfile.TemporaryDirectory(prefix="bare-mcore-") as tmp:
        for (p, t), part in shard(hf_to_mca(hf, cfg), tp, pp, cfg).items():
            save(part, f"{tmp}/pp{p}_tp{t}.safetensors")
        spawn(megatron_rank, tp * pp, {**job, "tp": tp, "pp": pp, "cfg": cfg, "shard_dir": tmp})
    return cfg


def gather_hf(out_dir, stem, tp, pp, cfg):
    """The ranks' `{stem}pp{p}_tp{t}` files joined over TP, stages renumbered, converted to HF names."""
    from safetensors.torch import load_file

    parts = {(p, t): load_file(f"{out_dir}/{stem}pp{p}_tp{t}.safetensors") for p in range(pp) for t in range(tp)}
    return mca_to_hf(gather(parts, tp, pp, cfg), cfg)


def megatron_logprobs(dir, dtypes, tp, pp, prompts, out_dir, realized=None, **kw):
    """Per dtype: the stage models forward every prompt set; the last stage's TP rank 0 saves the log-probs."""
    megatron_job(dir, tp, pp, {"mode": "logprobs", "dtypes": dtypes, "prompts": prompts, "out_dir": out_dir,
                               "realized": realized}, **kw)
    return {}


def megatron_train(dir, dtype, tp, pp, sequences, steps, out_dir, **kw):
    """megatron-core training; step-0 grads and first-step weights gathered to HF names as the harness saves them."""
    cfg = megatron_job(dir, tp, pp, {"mode": "train", "dtype": dtype, "sequences": sequences, "steps": steps,
                                     "out_dir": out_dir}, **kw)
    for kind in ("grads", "weights"):
        save(gather_hf(out_dir, f"{kind}_", tp, pp, cfg), f"{out_dir}/hf/{kind}.safetensors")
    return {"losses": json.loads(Path(f"{out_dir}/losses.json").read_text())}


def megatron_refit_source(dir, dtype, tp, pp, sequences, prompts, out_dir, steps=1, **kw):
    """Train `steps` steps, gather the live parameters to HF names (send order in the metadata); log-probs on
    `prompts` before and after the steps (written by the ranks)."""
    cfg = megatron_job(dir, tp, pp, {"mode": "refit_source", "dtype": dtype, "sequences": sequences, "steps": steps,
                                     "prompts": prompts, "out_dir": out_dir}, **kw)
    hf = gather_hf(out_dir, "live_", tp, pp, cfg)
    save(hf, f"{out_dir}/sync.safetensors", metadata={"send_order": json.dumps(list(hf))})
    return {}


# ---------------------------------------------------------------- megatron backend: one rank
def cpu_compat():
    """megatron-core 0.16.1 on CPU: its schedules, optimizer and grad-norm code allocate bookkeeping tensors with a
    literal device="cuda"; those modules get a torch whose tensor factories put them on the CPU."""
    import importlib

    import torch

    class CpuTorch:
        def __getattr__(self, name):
            attr = getattr(torch, name)
            if name not in ("zeros", "ones", "empty", "full", "tensor"):
                return attr

            def factory(*a, **k):
                if str(k.get("device", "")).startswith("cuda"):
                    k["device"] = "cpu"
                return attr(*a, **k)
            return factory

    for name in ("pipeline_parallel.schedules", "optimizer.optimizer", "optimizer.clip_grads", "utils"):
        importlib.import_module(f"megatron.core.{name}").torch = CpuTorch()


@contextmanager
def cuda_type_names():
    """While the optimizer sorts parameters by CUDA type name ("torch.cuda.FloatTensor"): CPU tensors spell it."""
    import torch

    own, real = torch.Tensor.__dict__.get("type"), torch.Tensor.type
    torch.Tensor.type = lambda self, dtype=None, non_blocking=False, **kw: (
        real(self).replace("torch.", "torch.cuda.", 1) if dtype is None and not kw and self.device.type == "cpu"
        else real(self, dtype, non_blocking, **kw))
    try:
        yield
    finally:
        if own is None:
            del torch.Tensor.type
        else:
            torch.Tensor.type = own


def causal_batch(seqs):
    import torch

    ids = make_batch(seqs)["input_ids"]
    n = ids.shape[1]
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None].expand(len(seqs), 1, -1, -1)
    return ids, torch.arange(n).expand(len(seqs), n), mask


class Stage:
    """A rank's group, parallel state and position in the pipeline."""

    def __init__(self, rank, world, port, job):
        import torch
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        ps.initialize_model_parallel(job["tp"], job["pp"], expert_tensor_parallel_size=job["tp"])
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        torch.cuda.current_device = lambda: torch.device("cpu")  # asked by RoPE and the attention buffer
        self.torch, self.dist, self.ps, self.job, self.cfg = torch, dist, ps, job, job["cfg"]
        self.p, self.t = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        self.first, self.last = self.p == 0, self.p == job["pp"] - 1
        self.tag, self.out = f"pp{self.p}_tp{self.t}", Path(job["out_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import load_file

        self.shard = load_file(f"{job['shard_dir']}/{self.tag}.safetensors")

    def build(self, dtype):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        cfg, tdtype = self.cfg, getattr(self.torch, dtype)
        tc = mcore_config(cfg, dtype, self.job["tp"], self.job["pp"])
        model = GPTModel(tc, get_gpt_layer_local_spec(None, False, qk_layernorm=False), vocab_size=cfg["vocab"],
                         max_sequence_length=cfg["max_pos"], pre_process=self.first, post_process=self.last,
                         parallel_output=False, share_embeddings_and_output_weights=cfg["tied"],
                         position_embedding_type="rope", rotary_percent=1.0, rotary_base=cfg["rope_base"])
        result = model.load_state_dict({k: v.to(tdtype) for k, v in self.shard.items()}, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{self.tag}: shard does not fit: {missing[:3]} {result.unexpected_keys[:3]}")
        return model, tc

    def logprobs(self, model, tc, dtype):
        """Eval forward of every prompt set (hidden states sent stage to stage); filled on the last stage's TP 0."""
        torch, dist, out = self.torch, self.dist, {}
        model.eval()
        with torch.no_grad():
            for name, seqs in self.job["prompts"].items():
                ids, positions, mask = causal_batch(seqs)
                if not self.first:
                    received = torch.empty(ids.shape[1], ids.shape[0], tc.hidden_size, dtype=getattr(torch, dtype))
                    dist.recv(received, src=self.ps.get_pipeline_model_parallel_prev_rank())
                    model.set_input_tensor(received)
                y = model(ids, positions, mask)
                if not self.last:
                    dist.send(y.contiguous(), dst=self.ps.get_pipeline_model_parallel_next_rank())
                elif self.t == 0:
                    out[name] = score(y, ids, self.job.get("realized"))
        return out

    def fit(self, model, dtype, steps, after_first_step=None):
        """megatron-core DDP (fp32 main_grad) + DistributedOptimizer (adam, the reference's hyper-parameters, no
        clipping), the forward-backward schedule over MICROBATCHES micro-batches, vocab-parallel cross-entropy."""
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        torch = self.torch
        cpu_compat()
        config = model.config
        config.calculate_per_token_loss, config.batch_p2p_sync = True, False
        ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=True))
        opt_config = OptimizerConfig(
            optimizer="adam", lr=OPTIMIZER["lr"], weight_decay=OPTIMIZER["weight_decay"],
            adam_beta1=OPTIMIZER["betas"][0], adam_beta2=OPTIMIZER["betas"][1], adam_eps=OPTIMIZER["eps"],
            bf16=dtype == "bfloat16", params_dtype=getattr(torch, dtype), use_distributed_optimizer=True,
            clip_grad=0.0, log_num_zeros_in_grad=False)
        with cuda_type_names():
            optimizer = get_megatron_optimizer(opt_config, [ddp], config_overrides={})
        config.no_sync_func, config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        seqs = self.job["sequences"]
        ids, positions, mask = causal_batch(seqs)
        labels = make_batch(seqs)["labels"]
        loss_mask = labels != IGNORE
        targets = labels.masked_fill(~loss_mask, 0)
        rows = torch.arange(len(seqs)).tensor_split(MICROBATCHES)

        def forward_step(data_iterator, stage):
            part = next(data_iterator)

            def loss_func(logits):
                per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets[part])
                loss_sum = (per_token * loss_mask[part]).sum()
                tokens = loss_mask[part].sum().to(torch.int)
                return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach().clone(), tokens.float()])}
            return stage(ids[part], positions[part], mask[part], runtime_gather_output=False), loss_func

        schedule, losses, grads = get_forward_backward_func(), [], {}
        for step in range(steps):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            reported = schedule(forward_step_func=forward_step, data_iterator=iter(rows), model=[ddp],
                                num_microbatches=MICROBATCHES, seq_length=ids.shape[1], micro_batch_size=len(rows[0]),
                                forward_only=False)
            if self.last:
                total = torch.stack([d["lm loss"] for d in reported]).sum(0)
                losses.append(float(total[0] / total[1]))
            if step == 0:
                grads = {n: p.main_grad.detach().float().clone() for n, p in model.named_parameters()
                         if getattr(p, "main_grad", None) is not None}
            optimizer.step()
            if step == 0 and after_first_step:
                after_first_step()
        return losses, grads

    def barrier_and_close(self):
        self.dist.barrier()
        self.dist.destroy_process_group()


def main_weights(model):
    """Each parameter's fp32 main weight after the step (DistributedOptimizer's main_param, else the parameter)."""
    out = {}
    for name, p in model.named_parameters():
        main = getattr(p, "main_param", None)
        out[name] = (p if main is None else main.view(p.shape)).detach().float().clone()
    return out


def megatron_rank(rank, world, port, job):
    """One Megatron rank: logprobs per dtype, train (grads/weights per rank) or refit_source (live parameters)."""
    s = Stage(rank, world, port, job)
    if job["mode"] == "logprobs":
        for dtype in job["dtypes"]:
            model, tc = s.build(dtype)
            out = s.logprobs(model, tc, dtype)
            if out:
                save(out, s.out / dtype / "logprobs.safetensors")
            s.dist.barrier()
    elif job["mode"] == "train":
        model, tc = s.build(job["dtype"])
        weights = {}
        losses, grads = s.fit(model, job["dtype"], job["steps"], lambda: weights.update(main_weights(model)))
        save(grads, s.out / f"grads_{s.tag}.safetensors")
        save(weights, s.out / f"weights_{s.tag}.safetensors")
        if s.last and s.t == 0:
            (s.out / "losses.json").write_text(json.dumps(losses))
    else:  # refit_source
        model, tc = s.build(job["dtype"])
        before = s.logprobs(model, tc, job["dtype"])
        losses, _ = s.fit(model, job["dtype"], job["steps"])
        after = s.logprobs(model, tc, job["dtype"])
        save({n: p.detach().clone() for n, p in model.named_parameters()}, s.out / f"live_{s.tag}.safetensors")
        if before:
            save(before, s.out / "logprobs_pre_step.safetensors")
            save(after, s.out / "logprobs.safetensors")
            (s.out / "losses.json").write_text(json.dumps(losses))
    s.barrier_and_close()


# ---------------------------------------------------------------- deepspeed backend
def ds_config(stage, dtype, hidden):
    zero = {"stage": stage, "reduce_bucket_size": hidden * hidden}  # HF's "auto"
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden), stage3_param_persistence_threshold=10 * hidden,
                    stage3_max_live_parameters=32 * hidden * hidden,  # the harness's LIVE_LAYERS (2) x 16 h^2
                    stage3_max_reuse_distance=32 * hidden * hidden, sub_group_size=32 * hidden * hidden)
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {**OPTIMIZER, "betas": list(OPTIMIZER["betas"]), "torch_adam": True}},
            "zero_optimization": zero, "bf16": {"enabled": dtype == "bfloat16"},
            "gradient_clipping": 0.0, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def deepspeed_rank(rank, world, port, job):
    """One DeepSpeed rank: the fp32 HF model in a ZeRO engine, then train or infer."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(job["stage"], job["dtype"], int(model.config.hidden_size)),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    (ds_train_steps if job["mode"] == "train" else ds_infer)(engine, job, rank, world, torch, dist)
    dist.barrier()


def ds_train_steps(engine, job, rank, world, torch, dist):
    """Each rank its rows (r::world), loss scaled so DeepSpeed's rank average is the global token mean; step-0
    full grads and first-step fp32 master weights (collective under ZeRO-3) saved by rank 0."""
    import torch.nn.functional as F
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    batch = make_batch(job["sequences"])
    total = int((batch["labels"] != IGNORE).sum())
    mine = {k: v[rank::world] for k, v in batch.items()}
    losses, grads, weights = [], {}, {}
    for step in range(job["steps"]):
        logits = engine(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"]).logits
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), mine["labels"].reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
        engine.backward(loss_sum / total * world)
        reported = loss_sum.detach().clone()
        dist.all_reduce(reported)
        losses.append(float(reported) / total)
        if step == 0:
            for name, p in engine.module.named_parameters():
                if (g := safe_get_full_grad(p)) is not None:
                    grads[name] = g.detach().float().clone()
        engine.step()
        if step == 0:  # ZeRO-0 + bf16 (FP16_UnfusedOptimizer) keeps fp32 masters safe_get_full_fp32_param misses
            opt = engine.optimizer
            unfused = {id(lo): hi for los, his in zip(opt.fp16_groups, opt.fp32_groups) for lo, hi in zip(los, his)} \
                if isinstance(opt, FP16_UnfusedOptimizer) else {}
            for name, p in engine.module.named_parameters():
                full = safe_get_full_fp32_param(p)
                full = unfused.get(id(p)) if full is None else full
                weights[name] = (p if full is None else full).detach().float().clone()
    if rank == 0:
        save(grads, f"{job['out_dir']}/grads.safetensors")
        save(weights, f"{job['out_dir']}/weights.safetensors")
        Path(f"{job['out_dir']}/result.json").write_text(json.dumps({"losses": losses}))


def ds_infer(engine, job, rank, world, torch, dist):
    """ZeRO eval forward: each rank scores its rows of every prompt set (a rank without rows still runs row 0)."""
    engine.eval()
    outputs = {}
    with torch.no_grad():
        for name, seqs in job["prompts"].items():
            batch, rows = make_batch(seqs), list(range(rank, len(seqs), world))
            logits = engine(input_ids=batch["input_ids"][rows or [0]],
                            attention_mask=batch["attention_mask"][rows or [0]]).logits
            part = torch.log_softmax(logits.float(), dim=-1).contiguous() if rows else None
            parts = [None] * world if rank == 0 else None
            dist.gather_object((rows, part), parts, dst=0)
            if rank == 0:
                full = torch.empty(len(seqs), *logits.shape[1:], dtype=torch.float32)
                for got_rows, got in parts:
                    if got_rows:
                        full[got_rows] = got
                outputs[name] = full
    if rank == 0:
        save(outputs, f"{job['out_dir']}/logprobs.safetensors")


def deepspeed_train(dir, stage, dtype, world, sequences, steps, out_dir, **_):
    """One fresh rank group per case (DeepSpeed keeps global state and patches torch under ZeRO-3)."""
    spawn(deepspeed_rank, world, {"mode": "train", "dir": dir, "stage": stage, "dtype": dtype,
                                  "sequences": sequences, "steps": steps, "out_dir": out_dir})
    return json.loads(Path(f"{out_dir}/result.json").read_text())


def deepspeed_logprobs(dir, dtypes, prompts, out_dir, stage=3, world=1, **_):
    """deepspeed_infer: a fresh ZeRO (3) rank group per dtype."""
    for dtype in dtypes:
        spawn(deepspeed_rank, world, {"mode": "infer", "dir": dir, "stage": stage, "dtype": dtype,
                                      "prompts": prompts, "out_dir": f"{out_dir}/{dtype}"})
    return {}


OPS = {"hf": {"load": hf_load, "save_load": hf_save_load, "logprobs": hf_logprobs,
              "greedy_reference": hf_greedy_reference, "train_reference": hf_train_reference},
       "megatron": {"config": megatron_config, "roundtrip": megatron_roundtrip, "logprobs": megatron_logprobs,
                    "train": megatron_train, "refit_source": megatron_refit_source},
       "deepspeed": {"train": deepspeed_train, "logprobs": deepspeed_logprobs}}
IMPORTS = {"hf": ("torch", "transformers", "safetensors.torch"), "megatron": ("torch", "megatron.core", "safetensors.torch"),
           "deepspeed": ("torch", "safetensors.torch")}  # deepspeed itself is imported in the ranks only


# ---------------------------------------------------------------- worker process and the replay
def worker(backend):
    """A backend's long-lived process: imports, then one JSON request per stdin line, one reply per line on the
    original stdout (fd 1 points at stderr so that library prints cannot break the protocol)."""
    import importlib
    import traceback

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for module in IMPORTS[backend]:
        importlib.import_module(module)
    replies.write(json.dumps({"ok": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": True, "result": OPS[backend][request["op"]](**request["args"])}
        except BaseException as exc:  # noqa: BLE001 - the orchestrator records it
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        replies.write(json.dumps(reply, default=str) + "\n")


class Worker:
    def __init__(self, backend, log_dir):
        started = time.monotonic()
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            env.pop(k, None)
        self.log = Path(log_dir) / f"{backend}.log"
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "wb"),
                                     env=env, start_new_session=True)
        self.read()
        self.start_s = time.monotonic() - started

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died: {self.log.read_text(errors='replace')[-2000:]}")
        return json.loads(line)

    def call(self, op, args):
        self.proc.stdin.write((json.dumps({"op": op, "args": args}) + "\n").encode())
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def remap(args, work):
    """Output paths moved under the work folder (the harness's scratch folder is gone)."""
    return {k: (str(Path(work) / str(v).lstrip("/")) if k in ("out_dir", "out_path") and v else v)
            for k, v in args.items()}


def sanity(replayed):
    """Evidence that the bare side computed the real thing (untimed): its Megatron / DeepSpeed fp32 log-probs vs a
    fresh transformers forward over the same prompts, and its trainers' step-0 grads and first-step weights vs its
    own HF reference (same dtype recipe); max |diff| each, over valid positions / every tensor."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def layout(a):
        return f"tp{a['tp']}pp{a['pp']}" if "tp" in a else f"zero{a.get('stage', 3)}-ws{a.get('world', 1)}"

    out, refs = {}, {}
    for c in replayed:
        b, a = c["backend"], c["args"]
        if c["op"] == "train_reference" and not a.get("warmup_zero_steps"):
            refs.setdefault((a["dtype"], a.get("compute_dtype") or a["dtype"]), a["out_dir"])
        if (b, c["op"]) in (("megatron", "logprobs"), ("deepspeed", "logprobs")) and "float32" in a["dtypes"] \
                and not a.get("realized") and f"{b}_logprobs_vs_hf" not in out:
            model, worst = AutoModelForCausalLM.from_pretrained(a["dir"], dtype=torch.float32).eval(), 0.0
            got = load_file(f"{a['out_dir']}/float32/logprobs.safetensors")
            with torch.no_grad():
                for name, seqs in a["prompts"].items():
                    batch = make_batch(seqs)
                    ref = torch.log_softmax(model(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).logits, -1)
                    worst = max(worst, float((got[name] - ref).abs()[batch["attention_mask"].bool()].max()))
            out[f"{b}_logprobs_vs_hf"] = {"layout": layout(a), "max_abs_diff": worst}
    for c in replayed:
        b, a = c["backend"], c["args"]
        ref_dir = refs.get((a.get("dtype"), a.get("dtype")))
        if c["op"] == "train" and ref_dir and f"{b}_train_vs_hf_reference" not in out:
            mine = f"{a['out_dir']}/hf" if b == "megatron" else a["out_dir"]
            diffs = {}
            for kind in ("grads", "weights"):
                x, y = load_file(f"{mine}/{kind}.safetensors"), load_file(f"{ref_dir}/{kind}.safetensors")
                diffs[f"{kind}_max_abs_diff"] = max(float((x[k] - y[k]).abs().max()) for k in y)
            out[f"{b}_train_vs_hf_reference"] = {"layout": layout(a), "dtype": a["dtype"], **diffs}
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("calls")
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", default="hf,megatron,deepspeed")
    ap.add_argument("--work", help="where outputs go (default: a temporary folder removed at the end)")
    opts = ap.parse_args(argv)
    chosen = opts.backends.split(",")
    calls = [json.loads(line) for line in Path(opts.calls).read_text().splitlines() if line.strip()]
    tmp = None if opts.work else tempfile.TemporaryDirectory(prefix="bare-")
    work = Path(opts.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    skipped, rows, replayed, workers, busy, starts = [], [], [], {}, {}, {}
    started = time.monotonic()
    for c in calls:
        b, op, a = c["backend"], c["op"], c["args"]
        why = ("backend not replayed here (vLLM: bench/engines.py)" if b not in chosen else
               f"status {c['status']!r} in the harness" if c["status"] != "ok" else
               "checkpoint already in the cache (not rebuilt)" if (b, op) == ("hf", "materialize") else
               f"op {b}.{op} not covered by bare.py" if op not in OPS.get(b, {}) else None)
        if why:
            skipped.append({"backend": b, "op": op, "harness_s": c["seconds"], "why": why})
            if (b, op) == ("hf", "materialize"):
                print(f"skipped hf.materialize ({c['seconds']:.1f}s in the harness): {why}")
            continue
        t0, args = time.monotonic(), remap(a, work)
        try:
            if b not in workers:
                workers[b] = Worker(b, work)
                starts[b] = workers[b].start_s
            reply = workers[b].call(op, args)
        except RuntimeError as exc:  # the worker died: recorded, a fresh one starts for the next call
            reply = {"ok": False, "error": str(exc)}
            workers.pop(b, None)
        seconds = time.monotonic() - t0
        busy[b] = busy.get(b, 0.0) + seconds
        row = {"backend": b, "op": op, "args_shown": {k: a[k] for k in SHOWN if k in a},
               "bare_s": round(seconds, 3), "harness_s": c["seconds"]}
        if not reply["ok"]:
            row["error"] = reply["error"]
            print(f"ERROR {b}.{op}: {reply['error']}\n{reply.get('traceback', '')}", file=sys.stderr)
        else:
            replayed.append({"backend": b, "op": op, "args": args})
        rows.append(row)
        print(f"{b}.{op}({', '.join(f'{k}={v}' for k, v in row['args_shown'].items())}) "
              f"bare {seconds:.1f}s / harness {c['seconds']:.1f}s", flush=True)
    for w in workers.values():
        w.close()
    wall = time.monotonic() - started
    result = {"wall_s": round(wall, 2), "calls_file": str(opts.calls),
              "backends": {b: {"start_s": round(starts[b], 2), "busy_s": round(busy[b], 2),
                               "calls": sum(r["backend"] == b for r in rows)} for b in starts},
              "harness_backends": {b: {"busy_s": round(sum(c["seconds"] for c in calls if c["backend"] == b), 2),
                                       "calls": sum(c["backend"] == b for c in calls)} for b in chosen},
              "calls": rows, "skipped": skipped}
    try:
        result["sanity"] = sanity(replayed)
    except Exception as exc:  # noqa: BLE001 - the timings stand; the sanity check says why it could not run
        result["sanity"] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(opts.out).write_text(json.dumps(result, indent=2))
    table = {}
    for r in rows + [{**s, "bare_s": None} for s in skipped if s["backend"] in chosen]:
        entry = table.setdefault((r["backend"], r["op"]), [0, 0, 0.0, 0.0])
        entry[0 if r["bare_s"] is not None else 1] += 1
        entry[2] += r["bare_s"] or 0.0
        entry[3] += r["harness_s"]
    print(f"\n{'backend.op':<28}{'calls':>6}{'skipped':>8}{'bare s':>10}{'harness s':>11}")
    for (b, op), (n, skip, bare, harness) in sorted(table.items()):
        print(f"{b + '.' + op:<28}{n:>6}{skip:>8}{bare:>10.1f}{harness:>11.1f}")
    for b in starts:
        print(f"{b}: worker start {starts[b]:.1f}s, busy {busy[b]:.1f}s bare vs "
              f"{result['harness_backends'][b]['busy_s']:.1f}s harness (busy: every call, the start in the first)")
    print(f"wall {wall:.1f}s; sanity {json.dumps(result['sanity'])}; result in {opts.out}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
