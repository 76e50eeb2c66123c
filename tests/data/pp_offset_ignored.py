"""Distributed-converter bug: the stage offset is ignored, so every pipeline stage loads layers 0..n-1.

Stage 0 is right; stage 1 runs stage 0's layers in place of its own (their shapes match, so nothing
complains at load time). Divergence localization must point at the first layer of stage 1.
"""
import harness.convert.dist as dist
from harness.convert.layer_spec import to_local

_correct_stage_of = dist.stage_of


def _offset_ignored(name, layout):
    m = dist.LAYER_RE.match(to_local(name))
    if m is None or layout.pp == 1:
        return _correct_stage_of(name, layout)
    index = int(m.group(1))
    if index >= layout.per_stage:
        return []  # the layers of later stages are never sent anywhere
    return [(stage, f"decoder.layers.{index}{m.group(2)}") for stage in range(layout.pp)]


dist.stage_of = _offset_ignored
