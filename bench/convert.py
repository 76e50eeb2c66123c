"""Benchmark: the streaming `python -m harness convert` against a plain safetensors load + save.

    .venv/bin/python bench/convert.py [--rounds 3] [--tp 1 --pp 1] [--cache warm|cold] [--fsync]

Builds (once, cached) a random Qwen2-0.5B-shaped bf16 checkpoint (~1 GB; hidden 896, 24 layers,
14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings) tensor by tensor, without
instantiating the HF model (written with harness.convert.stream.StreamWriter, whose output the tests
check is byte-identical to safetensors.save_file). Then, interleaved for --rounds rounds, each in a
fresh subprocess so that its peak RSS
(VmHWM from /proc/self/status, printed by the child at exit; ru_maxrss would include
the forking parent's peak, which Linux carries over exec) is its own:
  baseline: safetensors load_file + save_file of the checkpoint,
  convert:  `python -m harness convert --to mcore --tp 1 --pp 1` (its main(), in-process in the child).
Goals: convert time <= 1.5 x baseline time; peak RSS <= 3 x largest tensor + 1 GiB.
Page cache and write-back decide these figures more than the code does, so both are controlled per run:
  --cache warm: the source is read through once before each child (it comes from the page cache);
  --cache cold: its cached pages are dropped first (os.sync, then posix_fadvise DONTNEED: no root needed);
  --fsync: the child fsyncs every file it wrote before stopping the clock (write-back included), else
    the output may still sit dirty in the page cache when the clock stops. Every output goes to a fresh
    directory, and os.sync() runs before each child so the previous run's dirty pages do not throttle it.
The machine may be shared: the table shows every round, CPU time next to elapsed time. bench/run.py (b) runs
this at TP1 and TP2xPP2 in both regimes.
Not a test; CI does not run it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIG = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
              rms_norm_eps=1e-6, rope_theta=1000000.0)
GiB = 1 << 30

CHILD = r"""
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0 = time.perf_counter()
mode, src, dst, repo, layout, fsync = sys.argv[1:7]
tp, pp = layout.split("x")
import os
import torch  # both modes pay for torch before the clock starts


def flush(root):
    # write-back inside the clock: every written file and its directory reach the disk
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


if mode == "baseline":
    from safetensors.torch import load_file, save_file
    c1, t1 = cpu(), time.perf_counter()
    save_file(load_file(src + "/model.safetensors"), dst + "/model.safetensors", metadata={"format": "pt"})
    rc = 0
    if fsync == "1":
        flush(dst)
elif mode == "convert":
    sys.path.insert(0, repo)
    from harness.__main__ import main
    c1, t1 = cpu(), time.perf_counter()
    rc = main(["convert", "--to", "mcore", "--tp", tp, "--pp", pp, src, dst])
    if fsync == "1" and rc == 0:
        flush(dst)
else:  # idle: the interpreter + torch alone
    import safetensors.torch
    c1, t1 = cpu(), time.perf_counter()
    rc = 0
t2, c2 = time.perf_counter(), cpu()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "import_s": t1 - t0, "work_s": t2 - t1, "cpu_s": c2 - c1, "maxrss": hwm * 1024,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def cache_dir() -> Path:
    root = os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "certify-harness"
    return Path(root) / "bench" / "qwen2-0.5b-shaped-bf16"


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        })
    return out


def build(target: Path) -> Path:
    """config.json + model.safetensors, one random tensor in memory at a time."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoConfig

    from harness.convert.stream import StreamWriter

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        config = AutoConfig.for_model("qwen2", **CONFIG)
        config.dtype = "bfloat16"
        config.save_pretrained(staging)
        gen = torch.Generator().manual_seed(0)
        entries = {name: ("BF16", shape) for name, shape in shapes(CONFIG).items()}
        writer = StreamWriter(staging / "model.safetensors", entries, {"format": "pt"})
        for name, (_, shape) in entries.items():
            writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
        writer.close()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def drop_cache(path: Path) -> None:
    """Evict `path` from the page cache (its pages must be clean: sync first). Unprivileged, per file."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


def run_child(mode: str, src: Path, work: Path, layout: str = "1x1", cache: str = "warm",
              fsync: bool = False) -> dict:
    dst = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=work))
    if mode == "convert":
        shutil.rmtree(dst)  # the CLI creates OUT_DIR itself
    os.sync()  # no dirty pages from the previous run throttling this one's writes
    for weights in src.glob("*.safetensors"):
        drop_cache(weights) if cache == "cold" else warm_cache(weights)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(dst), str(REPO), layout,
                           "1" if fsync else "0"], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"]:
        raise RuntimeError(f"{mode} exited {result['rc']}:\n{proc.stderr[-3000:]}")
    result["wall_s"] = wall
    result["out_bytes"] = sum(p.stat().st_size for p in dst.rglob("*.safetensors")) if dst.exists() else 0
    shutil.rmtree(dst, ignore_errors=True)
    return result


KEYS = ("work_s", "cpu_s", "wall_s", "maxrss")


def measure(src: Path, rounds: int = 3, layout: str = "1x1", cache: str = "warm", fsync: bool = False) -> dict:
    """Interleaved baseline/convert rounds at one layout and cache regime: every run, medians, bests,
    the idle interpreter, and the checkpoint's largest tensor (the memory goal's unit)."""
    from harness.convert.stream import SafetensorsFile

    entries = [e for f in sorted(src.glob("*.safetensors")) for e in SafetensorsFile.open(f).entries]
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=src.parent))
    try:
        idle = run_child("idle", src, work)
        runs: dict[str, list[dict]] = {"baseline": [], "convert": []}
        for _ in range(rounds):
            for mode in runs:
                runs[mode].append(run_child(mode, src, work, layout, cache, fsync))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"runs": runs, "idle": idle, "layout": layout, "cache": cache, "fsync": fsync,
            "largest": max(e.end - e.start for e in entries), "largest_name": max(entries, key=lambda e: e.end - e.start).name,
            "total": sum(e.end - e.start for e in entries), "tensors": len(entries),
            "median": {m: {k: statistics.median(r[k] for r in rs) for k in KEYS} for m, rs in runs.items()},
            "best": {m: {k: min(r[k] for r in rs) for k in KEYS} for m, rs in runs.items()}}


def regime(cache: str, fsync: bool) -> str:
    return f"{cache} source cache, " + ("fsync'd output (write-back timed)" if fsync else
                                        "output left in the page cache (write-back not timed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm")
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args()

    t = time.perf_counter()
    src = build(cache_dir())
    print(f"checkpoint: {src} (ready in {time.perf_counter() - t:.1f} s)")
    m = measure(src, args.rounds, f"{args.tp}x{args.pp}", args.cache, args.fsync)
    largest, total, idle = m["largest"], m["total"], m["idle"]
    print(f"tensors: {m['tensors']}, {total / GiB:.3f} GiB; largest: {largest / 2**20:.1f} MiB ({m['largest_name']})")
    print(f"TP{args.tp}xPP{args.pp}; {regime(args.cache, args.fsync)}")
    print(f"\nidle interpreter (python + torch + safetensors): peak RSS {idle['maxrss'] / 2**20:.0f} MiB")
    print("work s: load+save or the conversion, in the child (imports excluded, torch imported before);")
    print("cpu s: its user+sys CPU time; wall s: the whole subprocess (python, imports, exit)")
    print(f"{'run':<10} {'round':>5} {'work s':>8} {'cpu s':>8} {'wall s':>8} {'peak RSS MiB':>13} {'written GiB':>12}")
    for mode, results in m["runs"].items():
        for i, r in enumerate(results):
            print(f"{mode:<10} {i:>5} {r['work_s']:>8.2f} {r['cpu_s']:>8.2f} {r['wall_s']:>8.2f} "
                  f"{r['maxrss'] / 2**20:>13.0f} {r['out_bytes'] / GiB:>12.3f}")
    conv, base = m["median"]["convert"], m["median"]["baseline"]
    print("\ntime, convert / baseline (goal <= 1.5x); the machine is shared, so best-of-rounds too:")
    for label, c, b in (("median", conv, base), ("best", m["best"]["convert"], m["best"]["baseline"])):
        print(f"  {label:<6}: work {c['work_s'] / b['work_s']:.2f}x ({c['work_s']:.2f} s vs {b['work_s']:.2f} s), "
              f"cpu {c['cpu_s'] / b['cpu_s']:.2f}x, wall {c['wall_s'] / b['wall_s']:.2f}x "
              f"({c['wall_s']:.2f} s vs {b['wall_s']:.2f} s)")
    print("memory (medians):")
    print(f"  peak RSS convert: {conv['maxrss'] / 2**20:.0f} MiB = {conv['maxrss'] / largest:.2f} x largest tensor; "
          f"(peak - 1 GiB) / largest = {(conv['maxrss'] - GiB) / largest:.2f} (goal <= 3)")
    print(f"  peak RSS baseline: {base['maxrss'] / 2**20:.0f} MiB = {base['maxrss'] / largest:.2f} x largest tensor "
          f"(model is {total / largest:.2f} x largest)")
    print(f"  peak RSS convert above the idle interpreter: {(conv['maxrss'] - idle['maxrss']) / 2**20:.0f} MiB "
          f"= {(conv['maxrss'] - idle['maxrss']) / largest:.2f} x largest tensor")


if __name__ == "__main__":
    main()
