"""Dense vs magnitude vs Wanda on the embedded EfficientNet-Lite0 (its 1x1 convolutions).

    python benchmarks/vision_prune.py [--ratios 0.3 0.4 0.5 0.7] [--nsamples 512] [--bn-recalibration 128]
                                      [--out benchmarks/results/vision_prune.md]

Targets: every conv_pw / conv_pwl inside the blocks (``Classifier(convs=True)`` defaults; stem,
depthwise convs, conv_head and classifier stay dense). Calibration: ``nsamples`` images drawn
with replacement (seed 0) from ``imagenet-photos/train`` (scikit-image photos + CIFAR-100), through
the model's eval transform. Wanda twice: with statistics from the dense forward (the reference's
vision setting, gathered once and shared by every ratio) and block-sequential (``propagate``:
each of the 16 blocks calibrates on the output of the already pruned blocks before it, as the
LLM path; the engine run by ``cli.py prune`` with ``calibration.propagate: true``), and with a
per-layer threshold (``[layer]``). Every row again with ``pruning.bias_correction`` (each conv's lost
mean output put back into the BatchNorm it feeds). Metrics: top-1 / top-5 on the 20 labelled ImageNet
photos (``imagenet-photos/val``), and top-1 agreement with the dense model on the 305 unlabelled
``natural-images`` (the low-noise measure of pruning damage).

Uses the same pieces as ``cli.py prune``: the Classifier module and datamodule, the engine's
``prune_sequential`` on the Classifier's ``prunable_blocks`` (``propagate=False`` for statistics
from the dense forward, ``True`` for the sequential rows), the registered methods, and the vision
metrics of ``wanda_pl.eval.vision`` (``Agreement``, top-1 / top-5 accuracy).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from wanda_pl.training.sharding import overall_sparsity  # noqa: E402
from wanda_pl.core.engine import prune_sequential  # noqa: E402
from wanda_pl.core.sparsity import SparsitySpec  # noqa: E402
from wanda_pl.data.image_files import load_image  # noqa: E402
from wanda_pl.data.images import ImageFolderDataModule  # noqa: E402
from wanda_pl.eval.vision import Agreement, top_k_accuracy, validation_results  # noqa: E402
from wanda_pl.methods import get_method  # noqa: E402
from wanda_pl.modules.classifier import Classifier  # noqa: E402


@torch.no_grad()
def recalibrate_batchnorm(module: Classifier, images: torch.Tensor, batch: int) -> None:
    """Re-estimate every BatchNorm's running mean/var on ``images`` (weights untouched, sparsity kept):
    a standard, cheap repair after pruning a conv net. Only the BatchNorm layers run in train mode."""
    bns = [m for m in module.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    module.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
        bn.train()
    for x in images.split(batch):
        module(x)
    module.eval()


@torch.no_grad()
def evaluate(module: Classifier, images: torch.Tensor, labels: torch.Tensor, batch: int, dense: Agreement) -> dict:
    """The package's vision metrics over every evaluation image; ``dense`` holds the dense top-1
    (the first call, on the dense model, stores it)."""
    module.eval()
    top1, top5 = top_k_accuracy(module.num_classes, 1), top_k_accuracy(module.num_classes, 5)
    dense.reset()
    for x, y, i in zip(images.split(batch), labels.split(batch), torch.arange(len(images)).split(batch)):
        logits = module(x)
        top1.update(logits, y)
        top5.update(logits, y)
        dense.update(logits, y, i)
    if dense.reference is None:
        dense.keep_as_reference()
    m = validation_results(top1, top5, dense)
    return {"top1": m["top1_correct"], "top5": round(m["top5"] * m["labelled"]), "labelled": m["labelled"],
            "agree_unl": m["agreement_unlabelled"], "agree_all": m["agreement"],
            "unlabelled": m["images"] - m["labelled"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.7])
    ap.add_argument("--methods", nargs="+",
                    default=["magnitude", "wanda", "wanda [layer]", "wanda (sequential)", "magnitude + bias correction",
                             "wanda + bias correction", "wanda [layer] + bias correction",
                             "wanda (sequential) + bias correction"],
                    help="'<method> [row|layer]': that comparison group instead of the method's default; "
                         "'<method> (sequential)': block by block on pruned activations; '... + bias correction': "
                         "each layer's lost mean output put back into the BatchNorm it feeds "
                         "(pruning.bias_correction)")
    ap.add_argument("--nsamples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bn-recalibration", type=int, default=0, metavar="N",
                    help="also report each pruned model after re-estimating BatchNorm statistics on the first N "
                         "calibration images (0: off)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision_prune.md"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    dense = Classifier(embedded="efficientnet-lite0", convs=True, calibration_batch_size=args.batch_size)
    dm = ImageFolderDataModule(root="imagenet-photos", unlabelled="natural-images", nsamples=args.nsamples,
                               seed=args.seed, batch_size=args.batch_size)
    dm.prepare_for(dense)
    items = dm.evaluation_items()
    images = torch.stack([load_image(p, dm.transform) for p, _ in items])
    labels = torch.tensor([label for _, label in items])
    calib = dm.calibration_images()
    print(f"eval: {int((labels >= 0).sum())} labelled + {int((labels < 0).sum())} unlabelled images; "
          f"calibration: {len(calib)} draws from {len(dm.calibration_files)} files", flush=True)

    agreement = Agreement()  # the dense top-1 of every image, compared against by every row
    rows = [("dense", 0.0, 0.0, evaluate(dense, images, labels, args.batch_size, agreement))]
    targets = dense.all_targets()
    print(f"{len(targets)} target layers", flush=True)

    times = {False: 0.0, True: 0.0}  # pruning runs with statistics from the dense forward / sequential
    for method_name in args.methods:
        base = method_name.replace(" + bias correction", "")
        group = re.search(r" \[(row|layer)\]", base)
        sequential = " (sequential)" in base
        method = get_method(re.sub(r" \((sequential)\)| \[(row|layer)\]", "", base))
        options = method.make_options(granularity=group and group.group(1))
        for ratio in args.ratios:
            module = copy.deepcopy(dense)
            mod_targets = module.all_targets()
            t1 = time.perf_counter()
            blocks, inputs = module.prunable_blocks(calib, "cpu")
            prune_sequential(blocks, inputs, module.block_targets, method, SparsitySpec.parse("unstructured", ratio),
                             options, bias_correction=base != method_name, propagate=sequential, progress=False)
            times[sequential] += time.perf_counter() - t1
            del inputs
            res = evaluate(module, images, labels, args.batch_size, agreement)
            rows.append((method_name, ratio, overall_sparsity(mod_targets), res))
            print(f"{method_name} {ratio:.0%}: {res}", flush=True)
            if args.bn_recalibration:
                recalibrate_batchnorm(module, calib[: args.bn_recalibration], args.batch_size)
                res = evaluate(module, images, labels, args.batch_size, agreement)
                rows.append((f"{method_name} + BN recalibration", ratio, overall_sparsity(mod_targets), res))
                print(f"{method_name} + BN {ratio:.0%}: {res}", flush=True)

    n_lab, n_unl = rows[0][3]["labelled"], rows[0][3]["unlabelled"]
    params = sum(m.weight.numel() for m in targets.values())
    total = sum(p.numel() for p in dense.model.parameters())
    lines = [
        "# EfficientNet-Lite0: dense vs magnitude vs Wanda (1x1 convolutions)",
        "",
        f"Model: embedded `efficientnet-lite0` (timm `tf_efficientnet_lite0`, ImageNet-1k, {total:,} parameters); "
        f"pruned layers: the {len(targets)} `conv_pw` / `conv_pwl` 1x1 convolutions inside the blocks "
        f"({params:,} weights, {params / total:.0%} of the model); stem, depthwise convs, `conv_head` and classifier dense.",
        f"Calibration: {args.nsamples} images drawn with replacement (seed {args.seed}) from the "
        f"{len(dm.calibration_files)} `imagenet-photos/train` images (scikit-image photos, 5 views each, + 20 CIFAR-100), "
        "model eval transform. 'wanda': statistics of every layer from the dense forward (the reference's vision "
        "setting); 'wanda (sequential)': block by block, each of the 16 blocks calibrated on the outputs of the already "
        "pruned blocks (`calibration.propagate: true`, the engine's LLM setting). Wanda: per-output-row comparison; "
        "magnitude: one threshold per layer (the paper's defaults); '[layer]': one threshold per layer for Wanda "
        "(`pruning.granularity: layer`). '+ bias correction' "
        "(`pruning.bias_correction: true`): each pruned conv's lost mean output, (W - W') E[x] over the calibration "
        "images, is subtracted from the running mean of the BatchNorm it feeds, and the methods weigh activations "
        "about their mean (wanda: |W| x std of the input). No fine-tuning."
        + (f" '+ BN recalibration' rows: the same pruned weights, BatchNorm running statistics re-estimated on "
           f"the first {args.bn_recalibration} calibration images." if args.bn_recalibration else
           " No BatchNorm recalibration."),
        f"Top-1 / top-5: the {n_lab} labelled ImageNet photos (`imagenet-photos/val`). Agreement: top-1 equal to the "
        f"dense model's on the {n_unl} unlabelled `natural-images` (mvtb-data photos, 5 views each, + 20 CIFAR-10).",
        "",
        "| method | target sparsity | actual sparsity | top-1 | top-5 | agreement (unlabelled) | agreement (all) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, ratio, actual, r in rows:
        lines.append(
            f"| {name} | {ratio:.0%} | {actual:.4f} | {r['top1']}/{r['labelled']} ({r['top1'] / r['labelled']:.0%}) | "
            f"{r['top5']}/{r['labelled']} ({r['top5'] / r['labelled']:.0%}) | {r['agree_unl']:.1%} | {r['agree_all']:.1%} |")
    lines += ["", f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads; total {time.perf_counter() - t0:.0f} s "
              f"(pruning runs in all: with dense statistics {times[False]:.0f} s, sequential {times[True]:.0f} s)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
