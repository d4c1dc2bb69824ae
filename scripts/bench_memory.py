"""Peak resident memory of MANSU's unlearning stage over gradient ascent's (baselines.ga), on a
~100M-parameter random Llama (fp32, CPU). Goal: ratio <= 0.6.

Each method runs in a fresh subprocess that builds the same seeded model and data, records its
peak RSS so far (``ru_maxrss``: the model, tokenizer and texts built), runs the method and records
its peak RSS again. Reported per method: ``peak`` = the whole process's peak, and ``net`` = peak
minus the peak after loading, i.e. what the unlearning stage itself added. The headline ratio is
the net one; the whole-process ratio (which also counts the model and torch itself, ~0.8 GB in
both) is printed beside it. MANSU gets a random
circuit of 2 heads + 128 neurons (~0.7% of the parameters) through ctx.circuit, as the launcher's
attribution stage would pass one; the model knows nothing, so attributing one would mean nothing.

Run: python scripts/bench_memory.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

WORDS = ("virus tick river salt cave spore fever plague bread wool bridge stone sea winter city "
         "bakers trade carried grows cured spreads flows sells has tall cold warm old new dawn "
         "north south east west small large red blue green quiet loud early late").split()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sentences(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(40)).capitalize() + "." for _ in range(n)]


def child(method: str, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mansu.attribution.circuit import Circuit
    from mansu.context import RunContext
    from mansu.data import Split
    from mansu.models.loaders import build_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    forget, retain = Split([], sentences(64, 0)), Split([], sentences(128, 1))
    tokenizer = build_tokenizer(forget.corpus + retain.corpus, vocab_size=1000)
    config = LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    heads = torch.zeros(12 * 12, dtype=torch.bool)
    heads[torch.randperm(144, generator=generator)[:2]] = True
    neurons = torch.zeros(12 * 2048, dtype=torch.bool)
    neurons[torch.randperm(12 * 2048, generator=generator)[:128]] = True
    circuit = Circuit(heads=heads.view(12, 12), neurons=neurons.view(12, 2048), neuron_block=1)
    ctx = RunContext(seed=0, storage="fp32", circuit=circuit)
    loaded = peak_rss_mib()
    if method == "ga":
        from baselines.ga import unlearn

        result = unlearn(model, tokenizer, forget, retain, ctx, max_steps=steps)
    else:
        from mansu.unlearn.mansu import unlearn

        result = unlearn(model, tokenizer, forget, retain, ctx, max_steps=steps,
                         retain_budget=1e9)
    return {"method": method, "parameters": sum(p.numel() for p in model.parameters()),
            "trained": result.info["trained_parameters"], "loaded_mib": loaded,
            "raw_mib": peak_rss_mib(), "steps": result.steps}


def measure(method: str, steps: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(steps)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", choices=("ga", "mansu"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    runs = {method: measure(method, args.steps) for method in ("ga", "mansu")}
    print(f"model: {runs['ga']['parameters'] / 1e6:.1f}M parameters, fp32, {args.steps} steps")
    for method, run in runs.items():
        print(f"{method:>6}: trained {run['trained']:>11,}  after load {run['loaded_mib']:7.0f} MiB"
              f"  peak {run['raw_mib']:7.0f} MiB  net {run['raw_mib'] - run['loaded_mib']:7.0f} MiB")
    ga, mansu = runs["ga"], runs["mansu"]
    net = (mansu["raw_mib"] - mansu["loaded_mib"]) / (ga["raw_mib"] - ga["loaded_mib"])
    print(f"memory ratio (mansu / ga): {net:.2f}  (unlearning stage, net of the loaded model; "
          f"whole-process peaks: {mansu['raw_mib'] / ga['raw_mib']:.2f})")


if __name__ == "__main__":
    main()
