"""Trainer bug: the loss is summed over tokens instead of averaged (each rank's sum goes to backward)."""
import harness.backends.deepspeed_ranks as ranks

ranks.rank_loss = lambda loss_sum, total, world: loss_sum * world
