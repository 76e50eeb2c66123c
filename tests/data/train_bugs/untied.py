"""Model-provider bug: a tied model is trained with its output layer untied from the embeddings."""
import torch

import harness.backends.deepspeed_ranks as ranks

_provide = ranks.provide_model


def _untied(directory):
    model = _provide(directory)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return model


ranks.provide_model = _untied
