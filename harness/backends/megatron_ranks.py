"""One rank of a multi-process megatron-core job (gloo on CPU, NCCL on GPU).

Spawned by the Megatron backend with world size pp * lcm(tp, ep) (expert tensor parallel size from
convert.dist.expert_tp: TP when ep is 1, else 1; the ranks EP adds beyond TP are data-parallel for the
dense weights). Each rank
loads the shard tagged with its (pp, tp, ep) ranks (names and shapes the converter got wrong are
reported, named), then either runs the prompt sets forward
(mode "logprobs": the last stage writes log-probabilities), trains on the fixed batch (mode
"train": loss per step, first-step gradients and updated weights per rank), or is the source of
a weight sync (mode "refit_source": log-probs before and after its train steps, and the live
post-step parameters of every rank, which the backend gathers and converts as ROLL's sync does).
Training runs megatron-core's own stack: DistributedDataParallel + DistributedOptimizer (fp32 main
weights and gradients), the forward-backward schedule of get_forward_backward_func over
MICROBATCHES micro-batches (1F1B across pipeline stages; megatron-core all-reduces tied embedding
gradients between first and last stage) and vocab-parallel cross-entropy. The evaluation forwards
(log-probs) pass hidden states between stages with send/recv, one prompt set at a time.

Data-parallel ranks (tp1 ep2 is dp2 for the dense weights) all run the same batch: eval forwards write
from data-parallel rank 0 only; in training each takes the whole batch, so DDP's gradient sum is twice
the single-rank gradient and finalize_model_grads divides by twice the tokens (the token count is
all-reduced over data-parallel ranks): exactly the reference's token-mean gradient, and every rank's
micro-batches, hence megatron-core's aux losses, equal the single-rank layout's. With dp > 1 the
optimizer is megatron-core's non-distributed one (gradients all-reduced, every rank the whole fp32 main
weights: Float16OptimizerWithFloat16Params in bf16, FP32Optimizer in fp32); the DistributedOptimizer
would shard the main weights and reduce-scatter the gradients over the data-parallel ranks.
MoE routing (mode "logprobs"): each stage's data-parallel rank 0 on TP rank 0 records every MoE layer's
router logits and top-k expert ids per prompt set (megatron_capture.record_routing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

from ..convert.dist import expert_tp


def _pad_to(t, multiple: int, value: int):
    """Right-pad the sequence dimension (1) to a multiple (sequence parallelism splits it over tp)."""
    import torch

    extra = -t.shape[1] % multiple
    return t if not extra else torch.cat([t, t.new_full((t.shape[0], extra), value)], dim=1)


def _causal_batch(seqs: list[list[int]], multiple: int = 1):
    import torch

    from ..train_step import make_batch

    ids = _pad_to(make_batch(seqs)["input_ids"], multiple, 0)  # the same right padding every backend gets
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


def setup_group(rank: int, world: int, port: int, job: dict):
    """The rank's process group and device (harness.backends.rank_setup: gloo on cpu; NCCL with one GPU
    per rank, torch.cuda.set_device(local rank), on cuda), then megatron-core's parallel state."""
    import torch

    from .rank_setup import init_rank

    placement = init_rank(rank, world, port, job.get("device", "cpu"))
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(job["tp"], job["pp"], expert_model_parallel_size=job.get("ep", 1),
                                 expert_tensor_parallel_size=expert_tp(job["tp"], job.get("ep", 1)))
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    if not placement.cuda:
        # megatron-core 0.16 asks torch.cuda.current_device() in RoPE and the attention buffer
        torch.cuda.current_device = lambda: torch.device("cpu")
    return placement


class Rank:
    """Process-group setup, building the stage, and the evaluation forward's pipeline plumbing."""

    def __init__(self, rank: int, world: int, port: int, job: dict):
        import torch
        import torch.distributed as dist

        self.job, self.torch, self.dist = job, torch, dist
        self.tp, self.pp, self.ep = job["tp"], job["pp"], job.get("ep", 1)
        placement = setup_group(rank, world, port, job)
        self.cuda, self.device = placement.cuda, placement.device
        from megatron.core import parallel_state as ps

        self.ps = ps
        from ..convert.dist import rank_tag

        self.pp_rank, self.tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        self.ep_rank, self.dp_rank = ps.get_expert_model_parallel_rank(), ps.get_data_parallel_rank()
        self.dp = ps.get_data_parallel_world_size()
        self.first, self.last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        self.tag = rank_tag(self.pp_rank, self.tp_rank, self.ep_rank, self.ep)
        self.capture_tag = f"pp{self.pp_rank}_tp{self.tp_rank}"  # data-parallel rank 0 captures (megatron_capture.join)
        # the one rank per stage (data-parallel 0, TP 0) that writes a stage's or the last stage's outputs
        self.writer = self.tp_rank == 0 and self.dp_rank == 0
        self.out = Path(job["out_dir"])
        self.out.mkdir(parents=True, exist_ok=True)

    def build(self, dtype: str, read_shard, train: bool = False):
        """The stage's GPTModel with its shard (`read_shard()`) loaded, or None (all ranks agree) if any shard failed.
        A MoE model that trains under TP is built sequence-parallel (megatron-core's MoE layer requires it)."""
        from megatron.core.models.gpt import GPTModel

        from .megatron import build_transformer_config, cpu_stays_cpu, cpu_training_compat, local_layer_spec

        torch, tdtype = self.torch, getattr(self.torch, dtype)
        tc, _ = build_transformer_config(self.job["mca_kwargs"], dtype, cpu=not self.cuda)
        tc = dataclasses.replace(tc, tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                                 expert_model_parallel_size=self.ep, expert_tensor_parallel_size=expert_tp(self.tp, self.ep),
                                 sequence_parallel=bool(train and tc.num_moe_experts and self.tp > 1),
                                 pipeline_dtype=tdtype, hidden_dropout=0.0, attention_dropout=0.0)
        if not self.cuda and tc.window_size:
            cpu_training_compat()  # the window mask is allocated on device="cuda" (CUDA_LITERAL_MODULES)
        with cpu_stays_cpu() if not self.cuda else contextlib.nullcontext():  # a tied head on another stage
            model = GPTModel(tc, local_layer_spec(tc), pre_process=self.first, post_process=self.last,
                             parallel_output=False, **self.job["gpt_kwargs"]).to(self.device)
        problems = _load(model, {k: v.to(tdtype) for k, v in read_shard().items()}, self.tag)
        flag = torch.tensor([len(problems)], dtype=torch.long, device=self.device)
        self.dist.all_reduce(flag)  # every rank skips together if any shard failed to load
        if problems:
            (self.out / f"load_problems_{self.tag}.json").write_text(json.dumps(problems))
        return (None if flag.item() else model), tc

    def forward(self, model, tc, dtype, seqs):
        """This stage's forward for one micro-batch; returns (input tensor or None, output).
        Sequence-parallel: right-padded to a multiple of tp (causal: earlier positions see none of it; MoE
        routes every token on its own, no capacity), the last stage's output cut back to the batch's length."""
        ids, positions, mask = (t.to(self.device) for t in _causal_batch(seqs, self.tp if tc.sequence_parallel else 1))
        length = max(len(s) for s in seqs)
        received = None
        if not self.first:
            rows = ids.shape[1] // self.tp if tc.sequence_parallel else ids.shape[1]
            received = self.torch.empty(rows, ids.shape[0], tc.hidden_size,
                                        dtype=getattr(self.torch, dtype), device=self.device)
            self.dist.recv(received, src=self.ps.get_pipeline_model_parallel_prev_rank())
            received.requires_grad_(self.torch.is_grad_enabled())
            model.set_input_tensor(received)
        out = model(ids, positions, mask)
        if not self.last:
            self.dist.send(out.detach().contiguous(), dst=self.ps.get_pipeline_model_parallel_next_rank())
        return received, (out[:, :length] if self.last else out)


def _prompt_logprobs(r: Rank, model, tc, dtype: str, routing: dict | None = None) -> dict:
    """Full-vocabulary log-probs per prompt set (eval, no grad); filled on the last stage's writer rank.
    `routing` (a MoE model's eval): filled with this stage's router decisions per set on its writer rank."""
    from ..checks.rollout import realized_logprobs
    from .megatron_capture import record_routing, routing_points

    torch = r.torch
    model.eval()
    outputs = {}
    recording = record_routing(model) if routing is not None else contextlib.nullcontext({})
    with torch.no_grad(), recording as records:
        for set_name, seqs in r.job["prompts"].items():
            _, out = r.forward(model, tc, dtype, seqs)
            if r.last and r.writer and (realized := r.job.get("realized")):  # rollout scoring: [batch, seq]
                outputs[set_name] = realized_logprobs(out.cpu(), _causal_batch(seqs)[0], **realized)
            elif r.last and r.writer:
                outputs[set_name] = torch.log_softmax(out.float(), dim=-1).cpu().contiguous()
            if routing is not None and r.writer:
                routing.update(routing_points(records, set_name, len(seqs), max(len(s) for s in seqs)))
    return outputs


def _logprobs(r: Rank, read_shard) -> None:
    from safetensors.torch import save_file

    for dtype in r.job["dtypes"]:
        model, tc = r.build(dtype, read_shard)
        if model is not None:
            routing = {} if tc.num_moe_experts else None
            outputs = _prompt_logprobs(r, model, tc, dtype, routing)
            (r.out / dtype).mkdir(parents=True, exist_ok=True)
            if outputs:
                save_file(outputs, str(r.out / dtype / "logprobs.safetensors"))
            if routing is not None and r.writer:  # joined over the stages by the backend (_join_routing)
                save_file(routing, str(r.out / dtype / f"routing_stage{r.pp_rank}.safetensors"))
        del model
        r.dist.barrier()


def _live(model, copy: bool = False) -> dict:
    """The rank's live parameters, in the dtype it trains in: views, saved at once (`copy`: detached copies that
    outlive the next step)."""
    return {n: (p.detach().cpu().clone() if copy else p.detach().cpu()) for n, p in model.named_parameters()}


# ---- seams: the trainer-side steps ROLL's megatron_train performs, one function each ----
# (a test plugin replaces one inside the rank processes, as tests/data/train_bugs do for DeepSpeed)
def microbatch_loss(loss_sum, num_tokens, num_microbatches: int):
    """What the loss function hands megatron-core's schedule for one micro-batch: (loss, num_tokens).

    With calculate_per_token_loss the schedule neither divides by the token count nor by the
    number of micro-batches; finalize_model_grads divides every gradient by the tokens of the whole
    batch (summed over micro-batches, broadcast over the pipeline), so the gradient is that of the
    token mean over the whole batch, as the reference computes it."""
    return loss_sum, num_tokens


def optimizer_step(optimizer, step: int) -> bool:
    """One megatron-core optimizer step (DistributedOptimizer); returns whether it updated."""
    update_successful, _grad_norm, _zeros = optimizer.step()
    return update_successful


def _megatron_trainer(r: Rank, model, dtype: str):
    """megatron-core's own training stack around the built stage: DistributedDataParallel with a
    contiguous fp32 gradient buffer (main_grad) and the DistributedOptimizer holding fp32 main
    weights (bf16: the model's parameters are the bf16 copy), with the reference's AdamW
    hyper-parameters; with data-parallel ranks (EP's), the non-distributed optimizer (module docstring).
    Returns (ddp model, optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ..train_step import OPTIMIZER
    from .megatron import cpu_training_compat, cuda_type_names

    torch = r.torch
    if not r.cuda:
        cpu_training_compat()
    bf16 = dtype == "bfloat16"
    sharded = r.dp == 1  # a DistributedOptimizer over one data-parallel rank shards nothing
    config = model.config
    config.calculate_per_token_loss = True  # loss = token mean over the whole batch (microbatch_loss)
    config.batch_p2p_sync = False  # the batched p2p path calls torch.cuda.synchronize() otherwise
    # Megatron-LM with --bf16 accumulates and reduces gradients in fp32 (main_grad)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               overlap_param_gather=False, use_distributed_optimizer=sharded)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=OPTIMIZER["lr"], weight_decay=OPTIMIZER["weight_decay"],
        adam_beta1=OPTIMIZER["betas"][0], adam_beta2=OPTIMIZER["betas"][1], adam_eps=OPTIMIZER["eps"],
        bf16=bf16, params_dtype=getattr(torch, dtype), use_distributed_optimizer=sharded,
        clip_grad=0.0,  # the reference does not clip (megatron-core's default is 1.0)
        log_num_zeros_in_grad=False)
    # config_overrides={}: every parameter in one group with the reference's weight decay (the
    # standard overrides would put biases and norms in a no-weight-decay group)
    with cuda_type_names() if not r.cuda else contextlib.nullcontext():
        optimizer = get_megatron_optimizer(opt_config, [ddp], config_overrides={})
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss  # 1 in bf16 and fp32 (no loss scaler)
    return ddp, optimizer


def _fp32_copies(optimizer) -> dict:
    """id(model parameter) -> its fp32 main copy in megatron-core's non-distributed bf16 optimizer
    (Float16OptimizerWithFloat16Params), over a ChainedOptimizer's parts (EP: dense and expert groups)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return {id(model_p): main_p for part in parts
            for model_g, main_g in zip(getattr(part, "float16_groups", []), getattr(part, "fp32_from_float16_groups", []))
            for model_p, main_p in zip(model_g, main_g)}


def _main_weights(model, optimizer) -> dict:
    """Each parameter's fp32 main weight after the optimizer step (the optimizer's master copy in bf16;
    in fp32 the parameter is its own main weight)."""
    weights, copies = {}, _fp32_copies(optimizer)
    for name, param in model.named_parameters():
        main = getattr(param, "main_param", None) if id(param) not in copies else copies[id(param)]
        if main is not None:
            assert main.numel() == param.numel(), f"{name}: main weight sharded over data-parallel ranks"
            main = main.view(param.shape)
        weights[name] = (param if main is None else main).detach().float().cpu().clone()
    return weights


def _fit(r: Rank, model, tc, dtype: str, steps: int, after_first_step=None, routing: dict | None = None,
         on_first_grads=None):
    """`steps` megatron-core train steps on the fixed batch; returns (losses, first-step grads).

    Each step: zero the gradient buffer, megatron-core's forward-backward schedule over
    MICROBATCHES micro-batches (1F1B across pipeline stages), vocab-parallel cross-entropy on the
    TP-sharded logits, then the optimizer's step. `after_first_step(optimizer)` runs right after
    the first update (the train suite judges the weights there). Also returns a MoE model's step-0
    load-balancing losses (_aux_losses). Sequence-parallel (MoE under TP): the batch is right-padded to a
    multiple of tp with masked labels. `routing` (a MoE model): filled with this rank's router decisions at
    every step (megatron_capture.train_routing_points) where it records them: data-parallel rank 0, every TP
    rank when sequence-parallel (each routes its own chunk of the sequence), else TP rank 0. `on_first_grads`:
    takes the first-step gradients at once (written out, not held through the later steps; none returned)."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..train_step import IGNORE, MICROBATCHES, make_batch
    from .megatron_capture import record_routing, train_routing_points

    torch = r.torch
    ddp, optimizer = _megatron_trainer(r, model, dtype)
    ddp.train()
    seqs = r.job["sequences"]
    multiple = r.tp if tc.sequence_parallel else 1
    ids, positions, mask = (t.to(r.device) for t in _causal_batch(seqs, multiple))
    labels = _pad_to(make_batch(seqs)["labels"], multiple, IGNORE).to(r.device)
    loss_mask = labels != IGNORE
    padding = _moe_padding_mask(r, tc, seqs, multiple)
    targets = labels.masked_fill(~loss_mask, 0)  # any id: masked positions are multiplied by 0
    rows = torch.arange(len(seqs), device=r.device).tensor_split(MICROBATCHES)
    if len({len(part) for part in rows}) != 1:
        raise ValueError(f"{len(seqs)} sequences do not split into {MICROBATCHES} equal micro-batches")

    def forward_step(data_iterator, stage):
        part = next(data_iterator)
        # parallel_output: this TP rank's slice of the vocabulary (the last stage's logits)
        output = stage(ids[part], positions[part], mask[part], runtime_gather_output=False,
                       **({"padding_mask": padding[part]} if padding is not None else {}))

        def loss_func(logits):
            # vocab_parallel_cross_entropy modifies its input in place (as in megatron-core's own GPT
            # loss): nothing else reads these logits and no backward needs them (bf16: .float() copies)
            per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets[part])
            loss_sum = (per_token * loss_mask[part]).sum()
            num_tokens = loss_mask[part].sum().to(torch.int)
            loss, tokens = microbatch_loss(loss_sum, num_tokens, MICROBATCHES)
            # what Megatron-LM logs: the micro-batch's loss sum and token count, reduced per step
            return loss, tokens, {"lm loss": torch.stack([loss_sum.detach().clone(), num_tokens.float()])}

        return output, loss_func

    schedule = get_forward_backward_func()
    losses, grads, aux = [], {}, {}
    records_routing = routing is not None and r.dp_rank == 0 and (tc.sequence_parallel or r.tp_rank == 0)
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        with record_routing(model, history=True) if records_routing else contextlib.nullcontext({}) as records:
            reported = schedule(forward_step_func=forward_step, data_iterator=iter(rows), model=[ddp],
                                num_microbatches=MICROBATCHES, seq_length=ids.shape[1],
                                micro_batch_size=len(rows[0]), forward_only=False)
        if records_routing:
            routing.update(train_routing_points(records, step, len(rows[0])))
        if r.last:
            total = torch.stack([d["lm loss"] for d in reported]).sum(0)
            losses.append(float(total[0] / total[1]))
        if tc.num_moe_experts:
            aux = _aux_losses(r, tc) if step == 0 else aux
        if step == 0:  # main_grad: the fp32 buffer after the schedule's finalize (÷ the batch's tokens)
            grads = {n: p.main_grad.detach().float().cpu().clone() for n, p in model.named_parameters()
                     if getattr(p, "main_grad", None) is not None}
            if on_first_grads is not None:
                on_first_grads(grads)
                grads = {}
        optimizer_step(optimizer, step)
        if step == 0 and after_first_step is not None:
            after_first_step(optimizer)
    return losses, grads, aux


def _moe_padding_mask(r: Rank, tc, seqs: list[list[int]], multiple: int):
    """A MoE model's padding mask for megatron-core's router ([b, s], True = padding: the batch's right padding
    and the sequence-parallel fill), so its load-balancing loss counts the valid tokens, as the reference's
    does; None for a dense model. GPTModel scatters it over the sequence-parallel ranks on the first stage
    only, so a later stage gets this TP rank's chunk of the sequence already."""
    from ..train_step import make_batch

    if not tc.num_moe_experts:
        return None
    padding = _pad_to(make_batch(seqs)["attention_mask"] == 0, multiple, True)
    if tc.sequence_parallel and not r.first:
        chunk = padding.shape[1] // r.tp
        padding = padding[:, r.tp_rank * chunk: (r.tp_rank + 1) * chunk]
    return padding.to(r.device)


def _moe_layers(tc) -> list[int]:
    """Global indices of the sparse layers (TransformerConfig.moe_layer_freq: every N-th, or a 0/1 list)."""
    freq = tc.moe_layer_freq
    pattern = freq if isinstance(freq, list) else [int(i % freq == 0) for i in range(tc.num_layers)]
    return [i for i, sparse in enumerate(pattern) if sparse]


def _aux_losses(r: Rank, tc) -> dict:
    """The step's load-balancing loss per MoE layer from megatron-core's tracker, as Megatron-LM logs it
    (reduce_aux_losses_tracker_across_ranks: summed over stages and over the TP/sequence shards a router saw,
    averaged over data-parallel ranks; then times 1/num_microbatches): the mean over the MICROBATCHES
    micro-batches of switch_load_balancing_loss on that micro-batch's valid tokens (_moe_padding_mask),
    BEFORE the coefficient (the tracker stores aux_loss / coeff). Clears the tracker. A coefficient of 0
    computes none: {}. The objective megatron-core differentiates adds, per micro-batch, coeff * that loss,
    over the batch's label tokens (train_step.megatron_aux_objective, measured)
    (calculate_per_token_loss); the reported train losses are the cross-entropy alone ("lm loss")."""
    from megatron.core.transformer.moe import moe_utils

    from ..train_step import MICROBATCHES

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    tracking = r.torch.tensor([int("load_balancing_loss" in tracker)], device=r.device)
    r.dist.all_reduce(tracking)  # the reduction below is collective
    if not tracking.item():
        return {}
    if "load_balancing_loss" not in tracker:  # a stage of dense layers only: zeros, reduced like the router's
        tracker["load_balancing_loss"] = {
            "values": r.torch.zeros(tc.num_layers, device=r.device), "avg_group": None, "reduce_group_has_dp": False,
            "reduce_group": r.ps.get_tensor_and_context_parallel_group()}
    moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    values = tracker["load_balancing_loss"]["values"].detach().float().cpu().clone()  # cleared in place below
    moe_utils.clear_aux_losses_tracker()
    return {f"layers.{i}": float(values[i]) / MICROBATCHES for i in _moe_layers(tc)}


def _train(r: Rank, read_shard) -> None:
    from safetensors.torch import save_file

    dtype = r.job["dtype"]
    model, tc = r.build(dtype, read_shard, train=True)
    if model is None:
        return
    routing = {} if tc.num_moe_experts else None
    # written as soon as they exist (a real-shape model's gradients and weights are two more copies of it);
    # the weights are judged after the first update (see harness.train_step.first_update_weights)
    def save(kind: str, tensors: dict) -> None:
        save_file(tensors, str(r.out / f"{kind}_{r.tag}.safetensors"))

    losses, _, aux = _fit(r, model, tc, dtype, r.job["steps"],
                          lambda optimizer: save("weights", _main_weights(model, optimizer)), routing,
                          on_first_grads=lambda grads: save("grads", grads))
    if routing:  # joined over the TP chunks and stages by the backend (megatron_capture.join_train_routing)
        save_file(routing, str(r.out / f"train_routing_{r.capture_tag}.safetensors"))
    if r.last and r.writer:
        (r.out / "losses.json").write_text(json.dumps(losses))
        if tc.num_moe_experts:
            (r.out / "aux_losses.json").write_text(json.dumps(
                {"aux_losses": aux, "aux_loss_coeff": tc.moe_aux_loss_coeff}))
    r.dist.barrier()


def _refit_source(r: Rank, read_shard) -> None:
    """The trainer side of an RL weight sync: job["steps"] train steps, then what the engine must reproduce.

    Writes the prompt log-probs before and after the step (last stage) and each rank's live
    parameters after the step (`live_<tag>`), which the backend gathers like ROLL's sync does.
    job["sync"] == "pre-step" is the planted fault of harness/convert/refit.py: the parameters
    are captured before the optimizer steps (a stale copy synced)."""
    from safetensors.torch import save_file

    dtype = r.job["dtype"]
    model, tc = r.build(dtype, read_shard, train=True)
    if model is None:
        return
    before = _prompt_logprobs(r, model, tc, dtype)
    stale = _live(model, copy=True) if r.job.get("sync") == "pre-step" else None
    losses, _, _ = _fit(r, model, tc, dtype, r.job.get("steps", 1))
    after = _prompt_logprobs(r, model, tc, dtype)
    save_file(stale if stale is not None else _live(model), str(r.out / f"live_{r.tag}.safetensors"))
    if before:
        save_file(before, str(r.out / "logprobs_pre_step.safetensors"))
        save_file(after, str(r.out / "logprobs.safetensors"))
        (r.out / "losses.json").write_text(json.dumps(losses))
    r.dist.barrier()


def _capture(r: Rank, read_shard) -> None:
    """Divergence localization: each rank's activation points (megatron_capture) on one batch, per dtype."""
    from safetensors.torch import save_file

    from .megatron_capture import capture

    for dtype in r.job["dtypes"]:
        model, tc = r.build(dtype, read_shard)
        if model is not None:
            model.eval()
            store: dict = {}
            with r.torch.no_grad(), capture(model, store):
                r.forward(model, tc, dtype, r.job["sequences"])
            (r.out / dtype).mkdir(parents=True, exist_ok=True)
            if r.dp_rank == 0:  # each (stage, TP rank) once: megatron_capture.join's keys
                save_file(store, str(r.out / dtype / f"capture_{r.capture_tag}.safetensors"))
        del model
        r.dist.barrier()


MODES = {"logprobs": _logprobs, "train": _train, "refit_source": _refit_source, "capture": _capture}


def run_rank(rank: int, world: int, port: int, job_path: str) -> None:
    from safetensors.torch import load_file

    job = json.loads(Path(job_path).read_text())
    if job.get("spec_path"):  # the spec's plugins exist in every rank (a planted trainer bug replaces a seam)
        from ..spec import load_spec
        from ..spec_plugins import import_spec_plugins

        import_spec_plugins(load_spec(job["spec_path"]))
    r = Rank(rank, world, port, job)
    path = str(Path(job["shard_dir"]) / f"{r.tag}.safetensors")
    # read at each build and dropped once loaded: a real-shape shard held beside the model and its optimizer
    # state is one more copy of the weights in every rank
    MODES[job.get("mode", "logprobs")](r, lambda: load_file(path))
    r.dist.barrier()
    r.dist.destroy_process_group()
