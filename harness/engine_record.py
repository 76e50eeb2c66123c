"""The one format every rollout engine reports in, so one set of checks judges vLLM, SGLang and lmdeploy.

A *record* (JSON) of a `logprobs`/`refit` operation:
  {"top_k": K, "sets": {set_name: [sequence, ...]}}
  sequence = {"prompt": [ids],
              "dists": [{token: logprob} for each prompt position t],  # distribution of the token after t;
                                                                       # dists[-1] is the first generated step
              "generated": [ids],                                      # greedy (temperature 0) continuation
              "gen_dists": [{token: logprob} for each generated step]} # gen_dists[0] == dists[-1]
  Each dist holds the engine's top-K entries plus the realized token (the next prompt token, or the
  generated one). Token ids are JSON object keys, so strings on disk; `load` turns them back into ints.

A *samples* file (JSON) of a `sample` operation (trainer<->engine parity):
  {"temperature": T, "logprobs_mode": "processed"|"raw",
   "samples": [{"cell": "n8-b4", "prompt": [ids], "generated": [ids], "logprobs": [lp per generated token]}]}
  `logprobs` are what the RL stack reads from the engine for the sampled tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Dist = dict[int, float]


def sequence(prompt: list[int], dists: list[Dist], generated: list[int], gen_dists: list[Dist]) -> dict[str, Any]:
    if len(dists) != len(prompt) or len(gen_dists) != len(generated):
        raise ValueError(f"record lengths disagree: prompt {len(prompt)} vs dists {len(dists)}, "
                         f"generated {len(generated)} vs gen_dists {len(gen_dists)}")
    return {"prompt": list(prompt), "dists": dists, "generated": list(generated), "gen_dists": gen_dists}


def save(path: str | Path, payload: dict[str, Any]) -> str:
    Path(path).write_text(json.dumps(payload))
    return str(path)


def _int_keys(dists: list[dict]) -> list[Dist]:
    return [{int(k): float(v) for k, v in d.items()} for d in dists]


def load(path: str | Path) -> dict[str, Any]:
    payload = json.loads(Path(path).read_text())
    for seqs in payload.get("sets", {}).values():
        for seq in seqs:
            seq["dists"], seq["gen_dists"] = _int_keys(seq["dists"]), _int_keys(seq["gen_dists"])
    return payload


def top_entries(logprobs_row, k: int, realized: int | None = None) -> Dist:
    """Top-k entries of one full-vocabulary log-prob row (a torch tensor), plus the realized token."""
    values, indices = logprobs_row.float().topk(min(k, logprobs_row.shape[-1]))
    dist = {int(i): float(v) for i, v in zip(indices.tolist(), values.tolist())}
    if realized is not None:
        dist[int(realized)] = float(logprobs_row[realized])
    return dist
