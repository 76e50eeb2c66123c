"""Data bug: labels shifted by one position too many (the model learns to predict two tokens ahead)."""
import harness.backends.deepspeed_ranks as ranks
from harness.train_step import IGNORE

_batch = ranks.trainer_batch


def _shifted(sequences):
    batch = _batch(sequences)
    labels = batch["labels"].clone()
    labels[:, :-1] = batch["labels"][:, 1:]
    labels[:, -1] = IGNORE
    batch["labels"] = labels
    return batch


ranks.trainer_batch = _shifted
