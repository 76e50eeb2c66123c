"""One rank of a multi-process megatron-core forward (gloo on CPU, NCCL on GPU).

Spawned by the Megatron backend with world size tp*pp. Each rank loads its
shard strictly (a name or shape the template got wrong is an error here),
runs the prompt sets through its pipeline stage (hidden states travel stage to
stage with send/recv) and the last stage writes log-probabilities.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path


def _causal_batch(seqs: list[list[int]]):
    import torch

    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
    positions = torch.arange(length).expand(len(seqs), length)
    # True = masked. Right padding needs no extra mask: valid positions never attend to later pads.
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None].expand(len(seqs), 1, -1, -1)
    return ids, positions, mask


def _load(model, state, where: str) -> list[str]:
    """Load a shard; names/shapes megatron-core expects but the converter got wrong are returned, named."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    problems = [f"{where} {k}: missing from the converted shard" for k in sorted(set(expected) - set(state))]
    problems += [f"{where} {k}: not a megatron-core parameter" for k in sorted(set(state) - set(expected))]
    problems += [f"{where} {k}: shape {tuple(state[k].shape)} != expected {expected[k]}"
                 for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    if not problems:
        model.load_state_dict(state, strict=False)
    return problems


def run_rank(rank: int, world: int, port: int, job_path: str) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    job = json.loads(Path(job_path).read_text())
    tp, pp = job["tp"], job["pp"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    use_cuda = torch.cuda.is_available() and job.get("device", "cpu") == "cuda"
    if use_cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(tp, pp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    if not use_cuda:
        # megatron-core 0.16 asks torch.cuda.current_device() in RoPE and the attention buffer
        torch.cuda.current_device = lambda: torch.device("cpu")
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .megatron import build_transformer_config

    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    first, last = pp_rank == 0, pp_rank == pp - 1
    shard = load_file(str(Path(job["shard_dir"]) / f"pp{pp_rank}_tp{tp_rank}.safetensors"))
    for dtype in job["dtypes"]:
        tdtype = getattr(torch, dtype)
        tc, _ = build_transformer_config(job["mca_kwargs"], dtype, cpu=not use_cuda)
        tc = dataclasses.replace(tc, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 pipeline_dtype=tdtype, hidden_dropout=0.0, attention_dropout=0.0)
        model = GPTModel(tc, get_gpt_layer_local_spec(), pre_process=first, post_process=last,
                         parallel_output=False, **job["gpt_kwargs"]).to(device)
        problems = _load(model, {k: v.to(tdtype) for k, v in shard.items()}, f"pp{pp_rank}/tp{tp_rank}")
        flag = torch.tensor([len(problems)], dtype=torch.long, device=device)
        dist.all_reduce(flag)  # every rank skips the forward together if any shard failed to load
        if problems:
            Path(job["out_dir"]).mkdir(parents=True, exist_ok=True)  # nothing else has created it yet
            (Path(job["out_dir"]) / f"load_problems_pp{pp_rank}_tp{tp_rank}.json").write_text(json.dumps(problems))
        if flag.item():
            del model
            dist.barrier()
            continue
        model.eval()
        outputs = {}
        with torch.no_grad():
            for set_name, seqs in job["prompts"].items():
                ids, positions, mask = (t.to(device) for t in _causal_batch(seqs))
                if not first:
                    hidden = torch.empty(ids.shape[1], ids.shape[0], tc.hidden_size, dtype=tdtype, device=device)
                    dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                    model.set_input_tensor(hidden)
                out = model(ids, positions, mask)
                if not last:
                    dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                elif tp_rank == 0:
                    outputs[set_name] = torch.log_softmax(out.float(), dim=-1).cpu().contiguous()
        if outputs:
            target = Path(job["out_dir"]) / dtype
            target.mkdir(parents=True, exist_ok=True)
            save_file(outputs, str(target / "logprobs.safetensors"))
        del model
        dist.barrier()
    dist.destroy_process_group()
