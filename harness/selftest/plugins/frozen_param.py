"""Self-test mutation (model provider): one parameter is left frozen (requires_grad False) in the trained model."""
import harness.backends.deepspeed_ranks as ranks

_provide = ranks.provide_model


def _frozen(directory):
    model = _provide(directory)
    next(p for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight")).requires_grad_(False)
    return model


ranks.provide_model = _frozen
