"""One rank of a multi-process megatron-core job (gloo on CPU, NCCL on GPU).

Spawned by the Megatron backend with world size tp*pp. Each rank loads its shard (names and
shapes the converter got wrong are reported, named), then either runs the prompt sets forward
(mode "logprobs": the last stage writes log-probabilities), trains on the fixed batch (mode
"train": loss per step, first-step gradients and updated weights per rank), or is the source of
a weight sync (mode "refit_source": log-probs before and after one train step, and the live
post-step parameters of every rank, which the backend gathers and converts as ROLL's sync does).
Hidden states and their gradients travel between pipeline stages with send/recv, one micro-batch
at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path


def _causal_batch(seqs: list[list[int]]):
    import torch

    from ..train_step import make_batch

    ids = make_batch(seqs)["input_ids"]  # the same right padding every backend gets
    length = ids.shape[1]
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


class Rank:
    """Process-group setup and the pipeline plumbing shared by both modes."""

    def __init__(self, rank: int, world: int, port: int, job: dict):
        import torch
        import torch.distributed as dist

        self.job, self.torch, self.dist = job, torch, dist
        self.tp, self.pp = job["tp"], job["pp"]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        self.cuda = torch.cuda.is_available() and job.get("device", "cpu") == "cuda"
        if self.cuda:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if self.cuda else "gloo", rank=rank, world_size=world)
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        ps.initialize_model_parallel(self.tp, self.pp)
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        if not self.cuda:
            # megatron-core 0.16 asks torch.cuda.current_device() in RoPE and the attention buffer
            torch.cuda.current_device = lambda: torch.device("cpu")
        self.ps = ps
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.pp_rank, self.tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        self.first, self.last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        self.tag = f"pp{self.pp_rank}_tp{self.tp_rank}"
        self.out = Path(job["out_dir"])
        self.out.mkdir(parents=True, exist_ok=True)

    def build(self, dtype: str, shard):
        """The stage's GPTModel with its shard loaded, or None (all ranks agree) if any shard failed."""
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from .megatron import build_transformer_config

        torch, tdtype = self.torch, getattr(self.torch, dtype)
        tc, _ = build_transformer_config(self.job["mca_kwargs"], dtype, cpu=not self.cuda)
        tc = dataclasses.replace(tc, tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                                 pipeline_dtype=tdtype, hidden_dropout=0.0, attention_dropout=0.0)
        model = GPTModel(tc, get_gpt_layer_local_spec(), pre_process=self.first, post_process=self.last,
                         parallel_output=False, **self.job["gpt_kwargs"]).to(self.device)
        problems = _load(model, {k: v.to(tdtype) for k, v in shard.items()}, self.tag)
        flag = torch.tensor([len(problems)], dtype=torch.long, device=self.device)
        self.dist.all_reduce(flag)  # every rank skips together if any shard failed to load
        if problems:
            (self.out / f"load_problems_{self.tag}.json").write_text(json.dumps(problems))
        return (None if flag.item() else model), tc

    def forward(self, model, tc, dtype, seqs):
        """This stage's forward for one micro-batch; returns (input tensor or None, output)."""
        ids, positions, mask = (t.to(self.device) for t in _causal_batch(seqs))
        received = None
        if not self.first:
            received = self.torch.empty(ids.shape[1], ids.shape[0], tc.hidden_size,
                                        dtype=getattr(self.torch, dtype), device=self.device)
            self.dist.recv(received, src=self.ps.get_pipeline_model_parallel_prev_rank())
            received.requires_grad_(self.torch.is_grad_enabled())
            model.set_input_tensor(received)
        out = model(ids, positions, mask)
        if not self.last:
            self.dist.send(out.detach().contiguous(), dst=self.ps.get_pipeline_model_parallel_next_rank())
        return received, out

    def backward(self, received, out, loss=None):
        """Backward through this stage: from the loss on the last stage, else from the next stage's gradient."""
        if self.last:
            loss.backward()
        else:
            grad = self.torch.empty_like(out)
            self.dist.recv(grad, src=self.ps.get_pipeline_model_parallel_next_rank())
            out.backward(grad)
        if received is not None:
            self.dist.send(received.grad.contiguous(), dst=self.ps.get_pipeline_model_parallel_prev_rank())

    def sync_tied_embedding_grads(self, model) -> None:
        """With tied embeddings split over stages, first and last stage each hold a copy: sum their grads."""
        if not self.job["tied"] or self.pp == 1 or not (self.first or self.last):
            return
        weight = model.embedding.word_embeddings.weight if self.first else model.output_layer.weight
        self.dist.all_reduce(weight.grad, group=self.ps.get_embedding_group())


def _prompt_logprobs(r: Rank, model, tc, dtype: str) -> dict:
    """Full-vocabulary log-probs per prompt set (eval, no grad); filled on the last stage's tp rank 0."""
    torch = r.torch
    model.eval()
    outputs = {}
    with torch.no_grad():
        for set_name, seqs in r.job["prompts"].items():
            _, out = r.forward(model, tc, dtype, seqs)
            if r.last and r.tp_rank == 0:
                outputs[set_name] = torch.log_softmax(out.float(), dim=-1).cpu().contiguous()
    return outputs


def _logprobs(r: Rank, shard) -> None:
    from safetensors.torch import save_file

    for dtype in r.job["dtypes"]:
        model, tc = r.build(dtype, shard)
        if model is not None:
            outputs = _prompt_logprobs(r, model, tc, dtype)
            if outputs:
                (r.out / dtype).mkdir(parents=True, exist_ok=True)
                save_file(outputs, str(r.out / dtype / "logprobs.safetensors"))
        del model
        r.dist.barrier()


def _live(model) -> dict:
    """The rank's live parameters (detached copies, in the dtype it trains in)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def _fit(r: Rank, model, tc, dtype: str, steps: int, after_first_step=None):
    """`steps` AdamW steps on the fixed batch; returns (losses, first-step grads). `after_first_step()`
    runs right after the first update (the train suite judges the weights there)."""
    from ..train_step import IGNORE, OPTIMIZER, loss_sum_and_count, make_batch

    torch = r.torch
    model.train()
    batch = make_batch(r.job["sequences"])
    total = int((batch["labels"] != IGNORE).sum())
    # AdamW is element-wise, so one optimizer per rank over its own shard equals one over the whole model
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER)
    losses, grads = [], {}
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        received, out = r.forward(model, tc, dtype, r.job["sequences"])
        loss = None
        if r.last:
            loss_sum, _ = loss_sum_and_count(out, batch["labels"].to(r.device))
            loss = loss_sum / total
            losses.append(float(loss))
        r.backward(received, out, loss)
        r.sync_tied_embedding_grads(model)
        if step == 0:
            grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters()
                     if p.grad is not None}
        optimizer.step()
        if step == 0 and after_first_step is not None:
            after_first_step()
    return losses, grads


def _train(r: Rank, shard) -> None:
    from safetensors.torch import save_file

    dtype = r.job["dtype"]
    model, tc = r.build(dtype, shard)
    if model is None:
        return
    weights = {}
    # judged after the first update (see harness.train_step.first_update_weights)
    losses, grads = _fit(r, model, tc, dtype, r.job["steps"], lambda: weights.update(
        {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}))
    save_file(grads, str(r.out / f"grads_{r.tag}.safetensors"))
    save_file(weights, str(r.out / f"weights_{r.tag}.safetensors"))
    if r.last and r.tp_rank == 0:
        (r.out / "losses.json").write_text(json.dumps(losses))
    r.dist.barrier()


def _refit_source(r: Rank, shard) -> None:
    """The trainer side of an RL weight sync: one train step, then what the engine must reproduce.

    Writes the prompt log-probs before and after the step (last stage) and each rank's live
    parameters after the step (`live_<tag>`), which the backend gathers like ROLL's sync does.
    job["sync"] == "pre-step" is the planted fault of harness/convert/refit.py: the parameters
    are captured before the optimizer step (a stale copy synced)."""
    from safetensors.torch import save_file

    dtype = r.job["dtype"]
    model, tc = r.build(dtype, shard)
    if model is None:
        return
    before = _prompt_logprobs(r, model, tc, dtype)
    stale = _live(model) if r.job.get("sync") == "pre-step" else None
    losses, _ = _fit(r, model, tc, dtype, 1)
    after = _prompt_logprobs(r, model, tc, dtype)
    save_file(stale if stale is not None else _live(model), str(r.out / f"live_{r.tag}.safetensors"))
    if before:
        save_file(before, str(r.out / "logprobs_pre_step.safetensors"))
        save_file(after, str(r.out / "logprobs.safetensors"))
        (r.out / "losses.json").write_text(json.dumps(losses))
    r.dist.barrier()


MODES = {"logprobs": _logprobs, "train": _train, "refit_source": _refit_source}


def run_rank(rank: int, world: int, port: int, job_path: str) -> None:
    from safetensors.torch import load_file

    job = json.loads(Path(job_path).read_text())
    r = Rank(rank, world, port, job)
    shard = load_file(str(Path(job["shard_dir"]) / f"{r.tag}.safetensors"))
    MODES[job.get("mode", "logprobs")](r, shard)
    r.dist.barrier()
    r.dist.destroy_process_group()
