"""Self-test mutation (trainer): the loss is summed over tokens instead of averaged."""
import harness.backends.deepspeed_ranks as ranks

ranks.rank_loss = lambda loss_sum, total, world: loss_sum * world
