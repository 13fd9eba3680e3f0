"""Scale: offloaded pruning's time and memory, memory flat in depth, data-parallel calibration,
batched calibration.

  python benchmarks/llm_scale.py [--parts a,b,c,d] [--big-layers 20]

(a) the embedded SmolLM2 pruned (Wanda 50%) with ``--model.offload`` none / cpu / disk: wall time,
    peak RSS above the interpreter's baseline, perplexities (equal in every mode);
(b) a random-weight Llama with the SmolLM2 tokenizer, built and saved here (~4 GB fp32) and the same
    with twice the layers, pruned with ``offload=disk``: peak RSS above baseline against the model's
    size (goal <= 0.35x) and between the two depths (goal: < 10% apart);
(c) 1 vs 2 DDP processes (CPU, gloo): calibration time and the samples each rank ran;
(d) calibration ``batch_size`` 1 vs 8 on SmolLM2: Wanda's prune wall time against one plain batch-1
    forward over the same tokens (goal at batch 8: <= 2.0x, the two-pass floor at batch 1).

Each run is a fresh ``cli.py prune`` subprocess that reports its own baseline (imports done, nothing
loaded) and peak RSS (``VmHWM``), so runs do not share memory or caches. Times are medians where
repeated; this machine is shared, so compare the rows of one run of this script, not across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SMOL = ["--model.name_or_path", "smollm2-135m", "--data.calibration", "wikipedia", "--data.evaluation", "wikipedia",
        "--pruning.method", "wanda", "--pruning.sparsity_ratio", "0.5", "--trainer.enable_progress_bar", "false"]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    """One prune run in this process: prints its baseline, peak RSS, wall time and report."""
    import cli  # noqa: F401  (imports torch, transformers, lightning: the baseline includes them)
    import transformers  # noqa: F401

    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    cli.main(args=args)
    wall = time.perf_counter() - t0
    out = Path(args[args.index("--output_dir") + 1])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    print("RESULT " + json.dumps({"baseline": baseline, "peak": _status("VmHWM"), "wall_s": wall, "report": report}))


def run(args, env=None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    proc = subprocess.run([sys.executable, __file__, "child", json.dumps(args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def ppl(report: dict, side: str) -> float:
    return report["metrics"]["ppl"][side]


def part_a(tmp: Path) -> list:
    rows = ["| offload | wall (s) | peak RSS above baseline (GiB) | dense ppl | pruned ppl |", "|---|---|---|---|---|"]
    for mode in ("none", "cpu", "disk"):
        r = run(["prune", *SMOL, "--data.nsamples", "16", "--data.seqlen", "512", "--data.max_eval_windows", "16",
                 "--model.offload", mode, "--save_model", "true", "--output_dir", str(tmp / f"a_{mode}")])
        rep = r["report"]
        rows.append(f"| {mode} | {r['wall_s']:.1f} | {gib(r['peak'] - r['baseline'])} | {ppl(rep, 'dense'):.4f} | "
                    f"{ppl(rep, 'pruned'):.4f} |")
    return rows


def build_random_llama(folder: Path, layers: int) -> int:
    """A Llama of ``layers`` blocks (hidden 2048, MLP 5632: ~45M parameters a block, ~0.2 GB fp32) with
    random weights, written block by block (never whole in memory) with the SmolLM2 tokenizer; returns
    its size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from wanda_pl.assets.resolve import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True, dtype="float32")
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    names = {k: v for k, v in meta.state_dict().items() if k != "lm_head.weight"}
    groups = [[k for k in names if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([k for k in names if not k.startswith("model.layers.")])
    folder.mkdir(parents=True)
    weight_map, total, g = {}, 0, torch.Generator().manual_seed(0)
    for i, keys in enumerate(groups):
        tensors = {}
        for k in keys:
            shape = names[k].shape
            tensors[k] = torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
            total += tensors[k].numel() * 4
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return total


def part_b(tmp: Path, layers: int) -> list:
    rows = ["| blocks | model size (GiB) | wall (s) | peak RSS above baseline (GiB) | ratio to size | dense ppl | pruned ppl |",
            "|---|---|---|---|---|---|---|"]
    peaks = []
    for n in (layers, 2 * layers):
        folder = tmp / f"llama_{n}"
        size = build_random_llama(folder, n)
        r = run(["prune", "--model.name_or_path", str(folder), "--data.calibration", "wikipedia",
                 "--data.evaluation", "wikipedia", "--data.nsamples", "4", "--data.seqlen", "128",
                 "--data.max_eval_windows", "4", "--pruning.method", "wanda", "--pruning.sparsity_ratio", "0.5",
                 "--model.offload", "disk", "--save_model", "true", "--trainer.enable_progress_bar", "false",
                 "--output_dir", str(tmp / f"b_{n}")])
        above = r["peak"] - r["baseline"]
        peaks.append(above)
        rep = r["report"]
        rows.append(f"| {n} | {gib(size)} | {r['wall_s']:.1f} | {gib(above)} | {above / size:.3f} | "
                    f"{ppl(rep, 'dense'):.1f} | {ppl(rep, 'pruned'):.1f} |")
        import shutil

        shutil.rmtree(folder)
        shutil.rmtree(tmp / f"b_{n}")
    rows.append(f"\nPeak RSS, {2 * layers} blocks against {layers}: {peaks[1] / peaks[0]:.3f}x "
                f"({(peaks[1] / peaks[0] - 1) * 100:+.1f}%)")
    return rows


def part_c(tmp: Path) -> list:
    rows = ["| processes | torch threads each | calibration (s) | prune total (s) | samples per rank | pruned ppl |",
            "|---|---|---|---|---|---|"]
    cores = os.cpu_count() or 1
    for n in (1, 2):
        extra = ["--trainer.strategy", "ddp", "--trainer.devices", "2"] if n == 2 else []
        r = run(["prune", *SMOL, "--data.nsamples", "16", "--data.seqlen", "512", "--data.max_eval_windows", "8",
                 "--trainer.accelerator", "cpu", *extra, "--output_dir", str(tmp / f"c_{n}")])
        rep = r["report"]
        rows.append(f"| {n} | {rep.get('torch_threads', max(1, cores // n))} | {rep['time_s']['calibration']:.1f} | "
                    f"{rep['time_s']['calibration'] + rep['time_s']['prune']:.1f} | "
                    f"{rep['calibration_samples_per_rank']} | {ppl(rep, 'pruned'):.4f} |")
    return rows


def part_d(repeats: int = 3) -> list:
    """In this process: one plain batch-1 forward over the calibration tokens, and Wanda's whole prune
    (capture, both passes, masks) at batch 1 and 8, each from the dense weights."""
    import copy
    from types import SimpleNamespace

    import torch

    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.data.text_module import TextDataModule
    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM("smollm2-135m")
    dm = TextDataModule("wikipedia", "wikipedia", nsamples=32, seqlen=512, seed=0)
    dm.prepare_for(module)
    ids = dm.calibration_data()
    dense = copy.deepcopy(module.model.state_dict())

    def forward():
        t0 = time.perf_counter()
        with torch.no_grad():
            for row in ids.split(1):
                module.model(input_ids=row, use_cache=False)
        return time.perf_counter() - t0

    def prune(batch):
        module.model.load_state_dict(dense)
        trainer = SimpleNamespace(callbacks=[Calibration(batch_size=batch)], is_global_zero=False,
                                  datamodule=dm, global_rank=0, world_size=1)
        t0 = time.perf_counter()
        Pruning("wanda", sparsity_ratio=0.5).prune(trainer, module)
        return time.perf_counter() - t0

    times = {"forward": [], 1: [], 8: []}
    for _ in range(repeats):  # interleaved: a slow spell of the machine hits every kind alike
        times["forward"].append(forward())
        for b in (1, 8):
            times[b].append(prune(b))
    fwd = statistics.median(times["forward"])
    rows = ["| | median wall (s) | ratio to one batch-1 forward |", "|---|---|---|",
            f"| plain forward, batch 1 ({ids.shape[0]} x {ids.shape[1]} tokens) | {fwd:.2f} | 1.00 |"]
    for b in (1, 8):
        t = statistics.median(times[b])
        rows.append(f"| Wanda prune, calibration batch_size {b} | {t:.2f} | {t / fwd:.2f} |")
    return rows


def main() -> None:
    from common import write_table

    from wanda_pl.commands.report import versions

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="a,b,c,d")
    p.add_argument("--big-layers", type=int, default=20, help="blocks of the smaller random Llama in (b)")
    opts = p.parse_args()
    parts = opts.parts.split(",")
    sections = []
    with tempfile.TemporaryDirectory(prefix="llm_scale.") as tmp:
        tmp = Path(tmp)
        for part, title, fn in (("a", "(a) SmolLM2-135M, Wanda 50%, 16 x 512 calibration, 16 x 512 evaluation",
                                 lambda: part_a(tmp)),
                                ("b", f"(b) random Llama, offload=disk, {opts.big_layers} and {2 * opts.big_layers} "
                                      "blocks, Wanda 50%, 4 x 128 calibration, 4 x 128 evaluation",
                                 lambda: part_b(tmp, opts.big_layers)),
                                ("c", "(c) DDP calibration on CPU (gloo), SmolLM2, Wanda 50%, 16 x 512 calibration",
                                 lambda: part_c(tmp)),
                                ("d", "(d) calibration batch size, SmolLM2, Wanda 50%, 32 x 512 calibration, median of 3",
                                 part_d)):
            if part in parts:
                print(title, flush=True)
                sections.append(f"### {title}\n\n" + "\n".join(fn()))
                print(sections[-1], flush=True)
    name = "llm_scale" if parts == ["a", "b", "c", "d"] else "llm_scale_" + "".join(parts)
    write_table(name, "| cores | data |", [f"| {os.cpu_count()} | wikipedia (embedded) |"],
                {"parts": parts, "versions": versions()})
    results = ROOT / "benchmarks" / "results" / f"{name}.md"
    results.write_text("\n\n".join(sections) + "\n\n" + results.read_text())


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        child(json.loads(sys.argv[2]))
    else:
        main()
