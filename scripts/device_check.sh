#!/usr/bin/env bash
# One short check on a lent GPU machine (the `device` tool): bitsandbytes' CUDA NF4 against the
# project's CPU reference, then a timed real-size run of the whole pipeline (a 1.1B-parameter Llama,
# GQA 32/8 heads, taught the synthetic facts, GA in bf16, NF4, attribution and CAD).
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
from mansu.quantization import nf4_codes, reference_nf4
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
start=$(date +%s)
python3 -m mansu.run model.hidden_size=2048 model.num_layers=16 model.num_heads=32 \
  model.num_kv_heads=8 model.intermediate_size=5632 model.inject_lr=3e-4 model.inject_batch_size=128 model.inject_steps=1000 \
  model.target_accuracy=0.9 storage=bf16 method=ga method.max_steps=40 method.lr=3e-5 \
  method.stop_forget_acc=null attribution.max_items=64 cpu_threads=null 2>&1 | grep -v "it/s\]\|s/it\]"
echo "real-size run wall time: $(( $(date +%s) - start )) s"
python3 - <<'PY'
import glob, json, os
path = sorted(glob.glob(os.environ["MANSU_OUTPUTS"] + "/runs/*/result.json"))[-1]
r = json.load(open(path))
print("status", r["status"], r.get("error", ""))
print("timings", r["timings"])
print("parameters", r["metrics"].get("diagnostics", {}).get("n_quantized_weights"))
PY
