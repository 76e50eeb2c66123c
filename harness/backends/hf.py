"""HF transformers: the reference every parity check compares against, and ROLL's DeepSpeed prerequisites.

Operations: materialize the reference checkpoint; load it the way ROLL's
model providers do (AutoModelForCausalLM.from_pretrained); save->load identity.
The reference forwards and the reference train step run on the session's device (model and
batch moved there; `--device cuda`: GPU 0 of the worker); the checkpoint is always built, loaded
and compared on the CPU, so its bytes never depend on the device.
"""
from __future__ import annotations

import tempfile
from typing import Any

from .base import Backend


class HFBackend(Backend):
    name = "hf"
    suites = ("hf",)
    packages = ("torch", "transformers", "safetensors")
    probe_module = "transformers"

    def op_materialize(self, model_type: str, overrides: dict, seed: int, dtype: str,
                       path: str | None = None) -> dict[str, Any]:
        from fixtures.tiny_models import materialize

        return {"dir": str(materialize(model_type, overrides, seed, dtype, path))}

    def _load(self, directory: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), output_loading_info=True)

    def _compute_model(self, directory: str, dtype: str):
        """The model for a computing operation, on the session's device (cuda: the worker's first GPU)."""
        model, _ = self._load(directory, dtype)
        return model.to(self._torch_device()) if self._cuda else model

    def _eval_model(self, directory: str, dtype: str, attention: str | None = None):
        """The model for a forward-only operation; `attention`: another of HF's attention kernels than its
        default (eager: a second bf16 noise run, see suites/engine_common.noise_attentions)."""
        model = self._compute_model(directory, dtype)
        if attention:
            model.set_attn_implementation(attention)
        return model.eval()

    @property
    def _cuda(self) -> bool:
        return getattr(self, "device", "cpu") == "cuda"

    def _torch_device(self):
        import torch

        return torch.device("cuda", 0) if self._cuda else torch.device("cpu")

    def _on_device(self, batch: dict):
        """The batch where the model is (unchanged on cpu)."""
        return {k: v.to(self._torch_device()) for k, v in batch.items()} if self._cuda else batch

    def op_load(self, dir: str, dtype: str) -> dict[str, Any]:  # noqa: A002 - wire name
        from transformers import PreTrainedModel

        model, info = self._load(dir, dtype)
        params = dict(model.named_parameters())
        return {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "is_pretrained_model": isinstance(model, PreTrainedModel),
            "missing_keys": sorted(info.get("missing_keys", [])),
            "unexpected_keys": sorted(info.get("unexpected_keys", [])),
            "mismatched_keys": sorted(str(k) for k in info.get("mismatched_keys", [])),
            "error_msgs": [str(e) for e in info.get("error_msgs", [])],
            "parameters": sum(p.numel() for p in params.values()),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params.values()}),
            "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        }

    def op_save_load(self, dir: str, dtype: str) -> dict[str, Any]:  # noqa: A002
        from ..checks.roundtrip import compare_state_dicts

        first, _ = self._load(dir, dtype)
        with tempfile.TemporaryDirectory(prefix="harness-hf-") as tmp:
            first.save_pretrained(tmp, safe_serialization=True)
            second, _ = self._load(tmp, dtype)
        volatile = {"_name_or_path", "transformers_version"}
        cfg_a = {k: v for k, v in first.config.to_dict().items() if k not in volatile}
        cfg_b = {k: v for k, v in second.config.to_dict().items() if k not in volatile}
        config_diff = sorted(k for k in set(cfg_a) | set(cfg_b) if cfg_a.get(k) != cfg_b.get(k))
        return {"comparison": compare_state_dicts(first.state_dict(), second.state_dict()),
                "config_keys_changed": config_diff}

    def op_logprobs(self, dir: str, dtype: str, prompts: dict[str, list[list[int]]],  # noqa: A002
                    out_path: str, attention: str | None = None, realized: dict | None = None) -> dict[str, Any]:
        """Full-vocabulary log-probabilities per prompt set ([batch, seq, vocab], right-padded); with `realized`
        ({"temperature", "scales"}: rollout scoring) only each realized next token's ([batch, seq])."""
        import torch
        from safetensors.torch import save_file

        from ..checks.rollout import realized_logprobs
        from ..train_step import make_batch

        model = self._eval_model(dir, dtype, attention)

        outputs = {}
        with torch.no_grad():
            for name, seqs in prompts.items():
                batch = self._on_device(make_batch(seqs))  # the same right padding every backend gets
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                outputs[name] = (realized_logprobs(logits, batch["input_ids"], **realized) if realized else
                                 torch.log_softmax(logits.float(), dim=-1).cpu().contiguous())
        save_file(outputs, out_path)
        return {"path": out_path}

    def op_capture(self, dir: str, dtype: str, sequences: list[list[int]], out_path: str) -> dict[str, Any]:  # noqa: A002
        """The localization points (harness.capture) of one right-padded batch, for divergence localization."""
        import torch
        from safetensors.torch import save_file

        from ..capture import hf_capture
        from ..train_step import make_batch

        model = self._compute_model(dir, dtype)
        model.eval()
        store: dict = {}
        batch = self._on_device(make_batch(sequences))
        with torch.no_grad(), hf_capture(model, store):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        save_file(store, out_path)
        return {"path": out_path, "points": len(store), "num_layers": int(model.config.num_hidden_layers)}

    def op_routing(self, dir: str, dtype: str, prompts: dict[str, list[list[int]]],  # noqa: A002
                   out_path: str, attention: str | None = None) -> dict[str, Any]:
        """The reference routing file (harness/checks/routing.py): per prompt set, every MoE layer's router
        logits and chosen experts over the right-padded batch every backend gets (`attention`: another of
        HF's attention kernels than its default, for the bf16 noise floor)."""
        from ..capture import routing_file

        return routing_file(self._eval_model(dir, dtype, attention), prompts, out_path, self._on_device)

    def op_greedy_reference(self, dir: str, dtype: str, prompts: dict[str, list[list[int]]],  # noqa: A002
                            max_new_tokens: int, out_path: str, attention: str | None = None) -> dict[str, Any]:
        """Per sequence: HF's greedy continuation and full-vocabulary log-probs along prompt + continuation.

        Saved as "<set>/<i>" [prompt+new, vocab] and "<set>/<i>/generated" [new]; what engine records
        (harness/engine_record.py) are compared against.
        """
        import torch
        from safetensors.torch import save_file

        model = self._eval_model(dir, dtype, attention)
        device = self._torch_device()
        tensors = {}
        with torch.no_grad():
            for name, seqs in prompts.items():
                for i, seq in enumerate(seqs):
                    tokens = list(seq)
                    for _ in range(max_new_tokens):  # no KV cache: every step recomputes, like a scorer
                        logits = model(input_ids=torch.tensor([tokens], device=device)).logits[0, -1]
                        tokens.append(int(logits.float().argmax()))
                    logits = model(input_ids=torch.tensor([tokens], device=device)).logits[0]
                    tensors[f"{name}/{i}"] = torch.log_softmax(logits.float(), dim=-1).cpu().contiguous()
                    tensors[f"{name}/{i}/generated"] = torch.tensor(tokens[len(seq):], dtype=torch.int64)
        save_file(tensors, out_path)
        return {"path": out_path}

    def op_train_reference(self, dir: str, dtype: str, sequences: list[list[int]], out_dir: str,  # noqa: A002
                           steps: int, warmup_zero_steps: int = 0, compute_dtype: str | None = None,
                           routing: str | None = None, attention: str | None = None,
                           aux_microbatches: int = 0) -> dict[str, Any]:
        """The plain-torch reference train step (AdamW), saved for the train-step checks.

        The checkpoint is loaded in fp32 (AdamW's master weights); dtype bfloat16 runs the trainers'
        mixed-precision recipe on it (harness.train_step.reference_step), compute_dtype float32 the
        same recipe with forward and backward in fp32; `routing` (a trainer's train routing file) replays
        that trainer's expert choices at every step; `attention` another of HF's attention kernels (eager);
        aux_microbatches: the MoE load-balancing term as megatron-core adds it (train_step.reference_step)."""
        import torch
        from safetensors.torch import load_file

        from ..train_step import make_batch, reference_step, replay_routing, save_train_result, spill_to

        torch_model = self._compute_model(dir, "float32")
        if attention:
            torch_model.set_attn_implementation(attention)
        torch_model.train()
        result = reference_step(torch_model, self._on_device(make_batch(sequences)), steps, warmup_zero_steps,
                                dtype=getattr(torch, dtype),
                                compute_dtype=getattr(torch, compute_dtype) if compute_dtype else None,
                                routing=replay_routing(load_file(routing)) if routing else None,
                                aux_microbatches=aux_microbatches, spill=spill_to(out_dir))
        return save_train_result(result, out_dir)


BACKEND = HFBackend
