"""Model-provider bug: a loader that drops one attention bias (zeroes it) before the backend runs."""
import harness.backends.deepspeed_ranks as ranks

_provide = ranks.provide_model


def _dropped(directory):
    model = _provide(directory)
    model.model.layers[0].self_attn.q_proj.bias.data.zero_()
    return model


ranks.provide_model = _dropped
