#!/usr/bin/env bash
# One short check on a lent GPU machine (the `device` tool): bitsandbytes' CUDA NF4 against the
# project's CPU reference, then the whole pipeline on a 1.1B-parameter Llama with per-stage times
# and peak GPU memory beside the preflight estimate. Not yet run: the session that wrote this
# version had no GPU.
# The machine's image lacks some pinned packages: carry them as wheels in .whl/ (see the device notes).
# Run there: bash scripts/device_check.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
export MANSU_OUTPUTS=${OUT:-/tmp}/outputs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import torch, bitsandbytes as bnb
from bitsandbytes.functional import quantize_4bit, dequantize_4bit
from mansu.quantize.quantizer import nf4_codes, reference_nf4
torch.manual_seed(0)
print("torch", torch.__version__, "bnb", bnb.__version__, torch.cuda.get_device_name())
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in ((4096, 4096), (1000, 77)):
        w = torch.randn(shape, dtype=dtype) * 0.02
        q, s = quantize_4bit(w.cuda(), blocksize=64, quant_type="nf4")
        cuda = dequantize_4bit(q, s).float().cpu().flatten()
        ref = reference_nf4(w).float().flatten()
        codes, absmax = nf4_codes(w)
        differ = int((cuda != ref).sum())
        print(f"nf4 {str(dtype):15s} {str(shape):13s} absmax equal: "
              f"{torch.equal(s.absmax.float().cpu(), absmax)}  values differing from the CPU "
              f"reference: {differ} of {cuda.numel()}")
PY
# The whole pipeline on a 1.1B-parameter Llama (GQA 32/8 heads) taught the synthetic facts: every
# stage (θ0 eval, NF4, attribution, GA in bf16, θu eval, diagnostics, noise control, CAD), each
# stage's wall time and peak GPU memory, beside the preflight estimate of the same config.
# Budget: one call of <= 8 minutes (injection capped at 600 steps, GA 20 steps, 64 attribution items).
ARGS="model.hidden_size=2048 model.num_layers=16 model.num_heads=32 model.num_kv_heads=8 \
  model.intermediate_size=5632 model.inject_lr=3e-4 model.inject_batch_size=128 model.inject_steps=600 \
  model.target_accuracy=0.9 storage=bf16 method=ga method.max_steps=20 method.lr=3e-5 \
  method.stop_forget_acc=null attribution.max_items=64 cpu_threads=null"
python3 -m mansu preflight=true $ARGS
start=$(date +%s)
timeout 420 python3 - $ARGS <<'PY' 2>&1 | grep -v "it/s\]\|s/it\]"
import sys, time
from contextlib import contextmanager
import torch
import mansu.run as run

@contextmanager
def measured_stage(timings, name):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        timings[name] = round(time.perf_counter() - start, 3)
        print(f"STAGE {name:22s} {timings[name]:8.1f} s  peak GPU "
              f"{torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB", flush=True)

run.stopwatch_stage = measured_stage
sys.argv = ["mansu", *sys.argv[1:]]
import mansu.cli
mansu.cli.main()
PY
echo "pipeline wall time: $(( $(date +%s) - start )) s"
python3 - <<'PY'
import glob, json, os
path = sorted(glob.glob(os.environ["MANSU_OUTPUTS"] + "/runs/*/result.json"))[-1]
r = json.load(open(path))
print("status", r["status"], r.get("error", ""))
print("timings", r["timings"])
print("cad", {k: r["metrics"].get("cad", {}).get(k) for k in ("thetau", "q_thetau")})
PY
