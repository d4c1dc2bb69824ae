"""Time every stage of one mansu run against the bare passes that stage fundamentally needs.

Runs one pipeline in-process (default: `experiment=smollm2_cpu`, GA, bf16 storage; `--tiny` for the
tiny model) with the stage cache off, so every stage computes. Then, in the same process and on the
same model, it times the bare model passes ("floor units") and prints per stage: wall time, process
CPU time, its floor and the ratio (wall / floor), and its share of the run. Floors:

- evaluate_*: one forward over the evaluation rows (pre-tokenised, length-sorted, logits only at
  the scored positions) of every split; quantize_*: the same (the model's own dtype, not 4-bit);
- attribution_theta0: EAP-IG per item set (2 forwards and `ig_steps` forward+backward passes over
  the items' rows), θ0's write gradients (the same on forget), one forward per node set the
  selection evaluated, per-item backward passes for the weight cut (`attribution_floors`); cad:
  2 forwards per model scored, plus the `ig_steps` passes when `eval.cad_scores`;
- unlearn: steps × one forward+backward (parameter gradients) of a `method.batch_size` batch;
- diagnostics: one NF4 reference rounding of θ0's and θu's quantized weights (no model pass);
- noise_control: one forward over the forget rows; first_order: one forward+backward and one
  forward over its forget texts; other_formats: two forwards over the forget rows per format.

On a shared machine the load of other processes adds noise; the CPU time shows how much.

    flock /tmp/mansu-heavy.lock python scripts/bench_run.py                # SmolLM2, GA, bf16
    python scripts/bench_run.py --tiny                                     # the tiny model
    python scripts/bench_run.py method=npo eval.other_formats=[fp4]        # any overrides
    python scripts/bench_run.py experiment=headline method=mansu           # make run's MANSU job
    python scripts/bench_run.py --recompute-counterfactual experiment=headline method=mansu \
        eval.cad_scores=true                                               # ... as before issue 12
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mansu.run as mansu_run  # noqa: E402
from mansu.attribution.stage import attribution_items  # noqa: E402
from mansu.evaluate.mcq import encode_pairs, mcq_requests  # noqa: E402
from mansu.quantize.quantizer import reference_nf4  # noqa: E402

SMOLLM2 = ["experiment=smollm2_cpu", "method=ga"]
TINY = ["model=tiny", "method=ga"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of SmolLM2")
    parser.add_argument("--cache-dir", default=str(ROOT / "outputs" / "cache"),
                        help="where the model (conversion/injection) is cached; stages never are")
    parser.add_argument("--recompute-counterfactual", action="store_true",
                        help="the selection's patching passes recompute the counterfactual "
                             "activations on every call, as before they were kept (for a before/after)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. method.max_steps=10")
    args = parser.parse_args()
    if args.recompute_counterfactual:
        from mansu.attribution.ablation import PatchEvaluator
        PatchEvaluator.__init__.__kwdefaults__["max_source_bytes"] = 0

    given = {o.split("=", 1)[0] for o in args.overrides}
    base = [o for o in (TINY if args.tiny else SMOLLM2) if o.split("=", 1)[0] not in given]
    overrides = [*base, f"cache_dir={args.cache_dir}", "eval.cache=false", *args.overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)

    cpu = {}
    original_stage = mansu_run.stopwatch_stage

    @contextmanager
    def timed_stage(timings, name):
        start = time.process_time()
        with original_stage(timings, name):
            yield
        cpu[name] = time.process_time() - start

    mansu_run.stopwatch_stage = timed_stage
    run_dir = Path(tempfile.mkdtemp(prefix="bench_run_"))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    record = mansu_run.run(cfg, run_dir, {"run_dir": str(run_dir)})
    run_wall, run_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    timings = record["timings"]

    floors = measure_floors(cfg, record)
    print(f"\n{' '.join(overrides)}  (torch threads {torch.get_num_threads()}, run dir {run_dir})")
    print(f"{'stage':<20}{'wall s':>9}{'cpu s':>9}{'floor s':>9}{'ratio':>8}{'share':>8}")
    for name, wall in timings.items():
        floor = floors.get(name)
        ratio = f"{wall / floor:7.1f}×" if floor else f"{'–':>8}"
        print(f"{name:<20}{wall:9.2f}{cpu.get(name, 0):9.2f}"
              f"{(f'{floor:9.2f}' if floor else f'{chr(8211):>9}')}{ratio}"
              f"{wall / run_wall:8.1%}")
    print(f"{'run total':<20}{run_wall:9.2f}{run_cpu:9.2f}")
    print(f"forget accuracy θ0 {acc(record, 'theta0')} θu {acc(record, 'thetau')} "
          f"Q(θu) {acc(record, 'q_thetau')}")


def acc(record: dict, model: str) -> str:
    value = record["metrics"]["accuracy"].get(model, {}).get("forget", {}).get("accuracy")
    return "–" if value is None else f"{value:.3f}"


def measure_floors(cfg, record: dict) -> dict[str, float]:
    """Bare-pass time of each stage, on θ0 freshly loaded in the run's storage dtype."""
    ctx = mansu_run.make_context(cfg, Path(tempfile.mkdtemp(prefix="bench_floor_")))
    benchmark, model, tokenizer = mansu_run.load(cfg, ctx)
    scoring = record["scoring"]
    batch_size = cfg.eval.batch_size
    splits = {"forget": benchmark.forget, "retain": benchmark.retain, **benchmark.extra_retain}
    forward = {name: forward_time(model, tokenizer, split.questions, scoring, batch_size)
               for name, split in splits.items()}
    all_splits = sum(forward.values())
    floors = {"evaluate_theta0": all_splits, "evaluate_thetau": all_splits,
              "quantize_theta0": all_splits, "quantize_thetau": all_splits,
              "noise_control": forward["forget"]}
    formats = cfg.eval.other_formats or []
    if formats:
        floors["other_formats"] = 2 * len(formats) * forward["forget"]

    method = cfg.method
    steps = record["metrics"]["unlearning"].get("steps") or method.get("max_steps", 0)
    if "batch_size" in method and benchmark.forget.corpus:
        texts = benchmark.forget.corpus
        batches = [random.Random(i).sample(texts, min(method.batch_size, len(texts)))
                   for i in range(3)]
        per_batch = min(train_time(model, tokenizer, b, param_grads=True) for b in batches)
        floors["unlearn"] = steps * per_batch

    if benchmark.forget.corpus and cfg.eval.first_order:
        texts = benchmark.forget.corpus[:256]
        floors["first_order"] = (train_time(model, tokenizer, texts, param_grads=True, batch=16)
                                 + train_time(model, tokenizer, texts, grad=False, batch=16))

    weights = {n: t for n, t in model.state_dict().items()
               if n.endswith(".weight") and t.dim() == 2 and "embed" not in n and "lm_head" not in n}
    start = time.perf_counter()
    for w in weights.values():
        reference_nf4(w, cfg.quantizer.blocksize)
    floors["diagnostics"] = 2 * (time.perf_counter() - start)

    attribution = cfg.attribution
    if attribution.get("enabled", False):
        floors.update(attribution_floors(cfg, record, model, tokenizer, splits, scoring))
    return floors


def attribution_floors(cfg, record: dict, model, tokenizer, splits: dict, scoring: str) -> dict:
    """attribution_theta0: EAP-IG on the forget and retain items (2 forwards + ig_steps
    forward-backward passes each), θ0's write gradients for the frozen CAD (the same on forget),
    one forward per node set the selection evaluated (read from the record: the trajectory, the
    chosen set, the curve, the zeroed weights, plus clean, all-patched and counterfactual), and
    the weight cut's per-item parameter gradients. cad: per model scored (θu, Q(θu)) 2 forwards,
    plus the ig_steps passes when ``eval.cad_scores``."""
    attribution, eval_cfg = cfg.attribution, cfg.eval
    ig_steps, max_items = attribution.ig_steps, attribution.max_items
    rows, forward, eap = {}, {}, {}
    for name in ("forget", "retain"):
        items = attribution_items(splits[name].questions, max_items, 0)
        rows[name] = [c + t for c, t in encode_pairs(tokenizer, [
            (context, cont) for q in items for context, conts in [mcq_requests(q, scoring)]
            for cont in conts])]
        forward[name] = rows_time(model, rows[name], attribution.batch_size, backward=False)
        eap[name] = 2 * forward[name] + ig_steps * rows_time(model, rows[name],
                                                             attribution.batch_size, backward=True)
    floor = eap["forget"] + eap["retain"] + eap["forget"]
    circuit = record["metrics"].get("circuit") or {}
    necessity = circuit.get("necessity")
    if necessity:
        sets = len(necessity["trajectory"]) + len(necessity.get("ranking_curve") or []) + 2
        floor += (3 + sets + 1) * forward["forget"] + (3 + sets) * forward["retain"]
        weights = circuit.get("weights") or {}
        if weights.get("node_share_of_quantized", 0) > weights.get("share_of_quantized", 1):
            floor += sum(rows_time(model, rows[name], 4, backward=True)  # one item (4 rows) a pass
                         for name in ("forget", "retain"))
    cad_models = 1 + ("q_thetau" in record["metrics"]["accuracy"])
    cad_per_model = 2 * forward["forget"] + (
        eap["forget"] - 2 * forward["forget"] if eval_cfg.get("cad_scores", True) else 0.0)
    return {"attribution_theta0": floor, "cad": cad_models * cad_per_model}


def eval_rows(tokenizer, questions, scoring: str) -> list[list[int]]:
    pairs = [(c, cont) for q in questions for c, conts in [mcq_requests(q, scoring)] for cont in conts]
    unique = {tuple(c + t)[:-1]: None for c, t in encode_pairs(tokenizer, pairs)}
    return [list(row) for row in unique]


def forward_time(model, tokenizer, questions, scoring: str, batch_size: int) -> float:
    if not questions:
        return 0.0
    return rows_time(model, eval_rows(tokenizer, questions, scoring), batch_size, backward=False,
                     last_only=True)


def packed(rows: list[list[int]], batch_size: int):
    rows = sorted(rows, key=len, reverse=True)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        yield ids, mask


def rows_time(model, rows, batch_size: int, *, backward: bool, last_only: bool = False) -> float:
    """Forward (and backward to the input embeddings only, as EAP-IG) over token rows."""
    device = model.get_input_embeddings().weight.device
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    try:
        for ids, mask in packed(rows, batch_size):
            ids, mask = ids.to(device), mask.to(device)
            if backward:
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
                torch.autograd.grad(logits.float().logsumexp(-1).sum(), embeds)
            else:
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=mask, use_cache=False,
                          logits_to_keep=1 if last_only else 0)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return time.perf_counter() - start


def train_time(model, tokenizer, texts, *, param_grads: bool = True, grad: bool = True,
               batch: int | None = None) -> float:
    """Forward (+ backward with parameter gradients) of the NLL over `texts`."""
    rows = [ids[:512] for ids in tokenizer(list(texts))["input_ids"]]
    device = model.get_input_embeddings().weight.device
    start = time.perf_counter()
    for ids, mask in packed(rows, batch or len(rows)):
        ids, mask = ids.to(device), mask.to(device)
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100))
            if grad and param_grads:
                loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
