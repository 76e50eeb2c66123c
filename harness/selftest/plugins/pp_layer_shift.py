"""Self-test mutation (distributed converter): the pipeline stages receive each other's layers at PP2."""
import harness.convert.dist as dist

_correct_stage_of = dist.stage_of


def _shifted_stage_of(name, layout):
    placed = _correct_stage_of(name, layout)
    if name.startswith("decoder.layers.") and layout.pp > 1:
        return [((stage + 1) % layout.pp, local) for stage, local in placed]
    return placed


dist.stage_of = _shifted_stage_of
