"""What joining a reconstruction step's calibration calls into one forward saves: one SmolLM2-135M
block (pruned 2:4 by magnitude), its recorded calls on real Wikipedia windows, fitted for the same
steps with the calls joined (the default) and one forward per call, alternating, medians; and the
error each ends with (the same fit up to float order).

    python benchmarks/reconstruct_batching.py                # a few minutes on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

from common import write_table

import torch  # noqa: E402

import wanda_pl.core.reconstruct as rec  # noqa: E402
from wanda_pl.commands.report import versions  # noqa: E402
from wanda_pl.data.text_module import TextDataModule  # noqa: E402
from wanda_pl.modules.causal_lm import CausalLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--modes", nargs="+", default=["block", "attn_mlp"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    module = CausalLM(args.model)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, 0, 1)
    dm.prepare_for(module)
    layer = module.model.model.layers[args.block]
    name = f"model.model.layers.{args.block}"
    targets = {f"{name}.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    # the dense block's inputs and outputs: the targets the pruned block is fitted to
    parts = {"block": layer, "self_attn": layer.self_attn, "mlp": layer.mlp}
    with torch.no_grad(), rec.record_calls(parts, "cpu") as calls:
        for row in dm.calibration_data().split(1):
            module.model(input_ids=row)
    masks = {}
    with torch.no_grad():
        for n, m in targets.items():  # 2:4 by magnitude: the two smallest of every four inputs
            groups = m.weight.abs().reshape(m.weight.shape[0], -1, 4)
            low = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, 2, largest=False).indices, True)
            masks[n] = low.reshape(m.weight.shape)
            m.weight.masked_fill_(masks[n], 0)
    real_joined = rec.joined
    rows = []
    for mode in args.modes:
        for batch in args.batches:
            settings = rec.Reconstruction(mode, args.steps, 1e-3, batch)
            seconds = {"joined": [], "one by one": []}
            errors = {}
            for _ in range(args.repeats):
                for way in seconds:
                    rec.joined = real_joined if way == "joined" else (lambda c: c[0] if len(c) == 1 else None)
                    block = copy.deepcopy(layer)
                    fitted = {"": block} if mode == "block" else {"self_attn": block.self_attn, "mlp": block.mlp}
                    t0 = time.perf_counter()
                    after = []
                    for i, (part, m) in enumerate(fitted.items()):
                        mine = {n: t for n, t in targets.items() if mode == "block" or f".{part}." in n}
                        local = {n: block.get_submodule(n[len(name) + 1:]) for n in mine}
                        kept = rec.kept_parameters(block, local, masks, name)
                        after.append(rec.fit(m, calls["block" if mode == "block" else part], kept, settings, "cpu",
                                             i)[1])
                    seconds[way].append(time.perf_counter() - t0)
                    errors[way] = sum(after)
            rec.joined = real_joined
            a, b = statistics.median(seconds["joined"]), statistics.median(seconds["one by one"])
            rows.append(f"| {mode} | {batch} | {b:.1f} | {a:.1f} | {b / a:.2f}x | {errors['one by one']:.4e} | "
                        f"{errors['joined']:.4e} |")
            print(rows[-1], flush=True)
    write_table("reconstruct_batching", "| mode | calls per step | one by one s | joined s | speed-up | error after, "
                "one by one | error after, joined |", rows,
                {"model": args.model, "block": args.block, "nsamples": args.nsamples, "seqlen": args.seqlen,
                 "steps": args.steps, "lr": 1e-3, "mask": "2:4 by magnitude", "calibration": "wikipedia",
                 "repeats": args.repeats, "threads": args.threads, "versions": versions()})


if __name__ == "__main__":
    main()
