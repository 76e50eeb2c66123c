"""Injects a pipeline remapping bug: the two stages receive each other's layers (a layer shift at PP2).

Imported as a spec plugin, so it patches the distributed converter inside the backend worker only.
"""
import harness.convert.dist as dist

_correct_stage_of = dist.stage_of


def _shifted_stage_of(name, layout):
    placed = _correct_stage_of(name, layout)
    if name.startswith("decoder.layers.") and layout.pp > 1:
        return [((stage + 1) % layout.pp, local) for stage, local in placed]
    return placed


dist.stage_of = _shifted_stage_of
