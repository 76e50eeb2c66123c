"""Loss-scale bug: the batch gradient divided by the number of micro-batches once too often.

The loss function divides each micro-batch's loss by num_microbatches (megatron-core's legacy
averaging) although the schedule runs with calculate_per_token_loss, which already normalises the
gradient by the batch's token count: the loss is divided twice. The logged loss (sum and token
count) is right and Adam's update is blind to a constant gradient scale, so only the first-step
gradients show it.
"""
import harness.backends.megatron_ranks as ranks
import harness.templates.qwen2  # noqa: F401 - the (correct) template the spec names

_loss = ranks.microbatch_loss


def _divided_again(loss_sum, num_tokens, num_microbatches):
    loss, tokens = _loss(loss_sum, num_tokens, num_microbatches)
    return loss / num_microbatches, tokens


ranks.microbatch_loss = _divided_again
