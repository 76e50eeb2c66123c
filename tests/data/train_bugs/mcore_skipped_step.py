"""Optimizer bug: megatron-core's first optimizer step skips one parameter group.

The biases and norm weights (the 1-D parameters megatron-core's standard overrides put in a group of
their own) keep their initial values through the first step while every other parameter is updated:
their Adam steps (lr = 1e-3 each) are missing. Loss and gradients barely move (the first-step gradients
are taken before the step), so only the weights after the first update show it.
"""
import harness.backends.megatron_ranks as ranks
import harness.templates.qwen2  # noqa: F401 - the (correct) template the spec names

_step = ranks.optimizer_step


def _skipping(optimizer, step):
    if step != 0:
        return _step(optimizer, step)
    hidden = []  # (param group, its full parameter list) of megatron-core's inner torch optimizers
    for inner in optimizer.chained_optimizers:  # DistributedOptimizer(s)
        skipped = {id(main) for models, mains in ((inner.model_float16_groups, inner.shard_fp32_from_float16_groups),
                                                  (inner.model_fp32_groups, inner.shard_fp32_groups))
                   for model_group, main_group in zip(models, mains)
                   for model, main in zip(model_group, main_group) if model.dim() == 1}
        for group in inner.optimizer.param_groups:
            hidden.append((group, group["params"]))
            group["params"] = [p for p in group["params"] if id(p) not in skipped]
    try:
        return _step(optimizer, step)
    finally:
        for group, params in hidden:
            group["params"] = params


ranks.optimizer_step = _skipping
