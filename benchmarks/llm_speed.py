"""Wall time of Wanda pruning against plain forward passes over the same calibration set.

Any activation-aware, error-propagating method needs at least two forward passes per block
(one to calibrate, one to propagate pruned activations), so ``2 x forward`` is the floor.
Each measurement runs in its own process, so its peak memory (RSS) is its own. Medians of
``--repeats`` runs.

    python benchmarks/llm_speed.py --nsamples 32 --seqlen 1024 --repeats 3

``--inference NAME=MODEL ...``: what a pruned model buys at inference instead, on this machine: prefill
tokens/s (batch 1 x 512 and 8 x 512, as ``generate`` runs it: the KV cache filled, the last position's logits
only), decode tokens/s (batch 1, 128 new tokens with the KV cache) and scoring tokens/s (8 x 512, every
position's logits, as perplexity and zero-shot need) of
each model (an embedded name or a saved folder), all loaded at once and timed in turn (dense, then each
pruned one, then again), medians of ``--repeats`` rounds, each as a ratio to the first:

    python cli.py prune --config configs/llm/smollm2_wikipedia.yaml --pruning.structure width \
        --pruning.width_mlp 0.2 --pruning.width_heads 0 --save_model true --output_dir /tmp/w20
    python cli.py prune --config configs/llm/smollm2_wikipedia.yaml --pruning.structure depth \
        --pruning.blocks_removed 3 --save_model true --output_dir /tmp/d3
    python cli.py prune --config configs/llm/smollm2_wikipedia.yaml --save_model true --output_dir /tmp/u50
    python benchmarks/llm_speed.py --inference dense=smollm2-135m width-mlp-20=/tmp/w20/model \
        depth-3=/tmp/d3/model unstructured-50=/tmp/u50/model --repeats 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(part: str, args) -> dict:
    import torch

    from common import Runner  # noqa: F401  (sets up sys.path and HF_HUB_OFFLINE)
    from wanda_pl.data.text_module import TextDataModule
    from wanda_pl.modules.causal_lm import CausalLM
    from wanda_pl.commands.report import peak_memory

    module = CausalLM(args.model, dtype=args.dtype)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, 0, 1)
    dm.prepare_for(module)
    ids = dm.calibration_ids()
    if part == "forward":
        t0 = time.perf_counter()
        with torch.no_grad():
            for row in ids.split(1):
                module.model(input_ids=row, use_cache=False)
        seconds = time.perf_counter() - t0
    else:
        report = Runner(module, dm).run(method=part, sparsity_ratio=0.5)
        seconds = report["time_s"]["calibration"] + report["time_s"]["prune"]
    return {"seconds": seconds, **peak_memory()}


PARTS = ("prefill 1", "prefill 8", "decode", "score 8")


def inference(models: dict, repeats: int, prefill: int = 512, new_tokens: int = 128) -> list:
    """Rows of prefill, decode and scoring tokens/s per model, alternating models within each round.

    Prefill is what ``generate`` runs before the first new token: the KV cache filled and the logits of
    the last position only (``logits_to_keep=1``, as ``generate`` sets it). Scoring (perplexity,
    zero-shot) needs every position's logits: the vocabulary projection of all 512 tokens is a fixed
    cost that structured pruning does not shrink, so it gets its own column."""
    import torch

    from common import Runner  # noqa: F401  (sets up sys.path and HF_HUB_OFFLINE)
    from wanda_pl.modules.causal_lm import CausalLM

    loaded = {name: CausalLM(path).model.eval() for name, path in models.items()}
    ids = torch.randint(100, 10000, (8, prefill), generator=torch.Generator().manual_seed(0))
    times = {name: {part: [] for part in PARTS} for name in loaded}

    def timed(part, tokens, fn):
        t0 = time.perf_counter()
        fn()
        return part, tokens / (time.perf_counter() - t0)

    with torch.no_grad():
        for round_ in range(repeats + 1):  # round 0 warms up (allocator, kernels' first calls) and is dropped
            for name, model in loaded.items():
                measured = [timed(f"prefill {b}", b * prefill,
                                  lambda b=b: model(input_ids=ids[:b], use_cache=True, logits_to_keep=1))
                            for b in (1, 8)]
                out = []
                measured.append(timed("decode", new_tokens, lambda: out.append(model.generate(
                    ids[:1, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    use_cache=True))))
                assert out[0].shape[1] == 16 + new_tokens
                measured.append(timed("score 8", 8 * prefill, lambda: model(input_ids=ids, use_cache=False)))
                if round_:
                    for part, rate in measured:
                        times[name][part].append(rate)
    base = next(iter(times.values()))
    rows = []
    for name, t in times.items():
        cells = []
        for key in PARTS:
            m, b = statistics.median(t[key]), statistics.median(base[key])
            cells.append(f"{m:.3g} ({m / b:.2f}x)")
        params = sum(p.numel() for p in loaded[name].parameters())
        zeros = sum(int((p == 0).sum()) for p in loaded[name].parameters())
        rows.append(f"| {name} | {params / 1e6:.1f}M ({zeros / params:.1%} zeros) | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


SPEED_HEADER = ("| model | parameters | prefill tok/s, 1 x 512 | prefill tok/s, 8 x 512 | decode tok/s, 1 x 128 new | "
                "scoring tok/s, 8 x 512 (all logits) |")
SPEED_ORDER = ("every model once per round, in the order given; one warm-up round dropped; medians over rounds; "
               "prefill as generate runs it (KV cache, last position's logits only), scoring with every position's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--inference", nargs="+", metavar="NAME=MODEL", help="time inference of these models instead")
    ap.add_argument("--name", default="llm_speed_inference", help="results/<name>.md of --inference")
    args = ap.parse_args()
    if args.inference:
        import torch

        from common import write_table
        from wanda_pl.commands.report import versions

        models = dict(m.split("=", 1) for m in args.inference)
        rows = inference(models, args.repeats)
        write_table(args.name, SPEED_HEADER, rows,
                    {"models": models, "repeats": args.repeats, "threads": torch.get_num_threads(),
                     "order": SPEED_ORDER,
                     "versions": versions()})
        return
    if args.part:
        print("RESULT " + json.dumps(measure(args.part, args)))
        return

    def run(part: str) -> dict:
        cmd = [sys.executable, str(HERE / "llm_speed.py"), "--part", part] + [
            f"--{k}={v}" for k, v in (("model", args.model), ("dtype", args.dtype), ("nsamples", args.nsamples),
                                      ("seqlen", args.seqlen))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])

    forward = [run("forward") for _ in range(args.repeats)]
    pruned = [run(args.method) for _ in range(args.repeats)]
    f = statistics.median(r["seconds"] for r in forward)
    p = statistics.median(r["seconds"] for r in pruned)
    rows = [
        f"| one forward pass over the calibration set | {f:.1f} | 1.00 | {max(r['cpu_rss_mb'] for r in forward):.0f} |",
        f"| {args.method} prune (capture + 2 passes per block + masks) | {p:.1f} | {p / f:.2f} | "
        f"{max(r['cpu_rss_mb'] for r in pruned):.0f} |",
    ]
    from common import write_table
    from wanda_pl.commands.report import versions

    write_table("llm_speed", "| run | median seconds | x forward | peak RSS (MB) |", rows,
                {"model": args.model, "dtype": args.dtype, "nsamples": args.nsamples, "seqlen": args.seqlen,
                 "repeats": args.repeats, "floor": "2.00 x forward", "ratio_to_floor": round(p / (2 * f), 3),
                 "versions": versions()})


if __name__ == "__main__":
    main()
