"""Sharded fine-tuning: FSDP2 (``fully_shard``, DTensor weights) through Lightning's
ModelParallelStrategy keeps every mask, on CPU with gloo and 2 processes; FSDP1 and DeepSpeed
are refused with a message that points to it.

The 2-process run re-executes this file as a script (Lightning's launcher starts rank 1 with the
same command line), so the worker lives under ``if __name__ == "__main__"``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEQLEN, NSAMPLES, STEPS = 32, 8, 4


def datamodule(text_file):
    from wanda_pl.data.text_module import TextDataModule

    return TextDataModule(str(text_file), str(text_file), nsamples=NSAMPLES, seqlen=SEQLEN, max_eval_windows=2,
                          batch_size=2)


# --------------------------------------------------------------------------- the 2-process worker
def _full_state(model):
    """Every parameter and buffer gathered whole (a collective: all ranks call it)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}


def _worker(model_dir, text_file, masks_file, out):
    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor, distribute_tensor

    from wanda_pl.callbacks import Pruning

    out = Path(out)
    masks = torch.load(masks_file, weights_only=True)
    from wanda_pl.modules.causal_lm import CausalLM as Module  # its configure_model shards with FSDP2

    class Probe(L.Callback):
        """After the Pruning callback, before each optimizer step: records whether the gradients of
        pruned weights are zero, then writes 1.0 into every pruned weight (as stale optimizer state
        could): only the re-masking after the step puts the zeros back."""

        def __init__(self):
            self.steps, self.grads_zero, self.types = 0, [], set()

        @torch.no_grad()
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.steps += 1
            for name, mask in masks.items():
                w = pl_module.model.get_submodule(name).weight
                self.types.add((type(w).__name__, type(w.grad).__name__))
                self.grads_zero.append(bool((w.grad.full_tensor()[mask] == 0).all()))
                revived = distribute_tensor(w.full_tensor().masked_fill(mask, 1.0), w.device_mesh, w.placements,
                                            src_data_rank=None)
                w.to_local().copy_(revived.to_local())

    def trainer(callbacks, steps):
        return L.Trainer(accelerator="cpu", devices=2,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=callbacks)

    module = Module(str(model_dir), learning_rate=1e-2, weight_decay=0.1)
    pruning, probe = Pruning(masks_from=str(masks_file)), Probe()
    t = trainer([pruning, probe], STEPS)
    t.fit(module, datamodule=datamodule(text_file))
    weights = _full_state(module.model)
    ckpt = out / "ckpt"
    t.save_checkpoint(ckpt)  # a distributed checkpoint: a folder, the callbacks' state in meta.pt
    try:  # masks cannot be computed on sharded weights: refused, pointing to masks_from
        Pruning(method="magnitude", enabled=True).obtain_masks(t, module)
        refusal = None
    except NotImplementedError as err:
        refusal = str(err)

    # Resume: a fresh dense model and a callback with no masks of its own; all comes from the checkpoint.
    module2 = Module(str(model_dir), learning_rate=1e-2, weight_decay=0.1)
    resumed, probe2 = Pruning(), Probe()
    t2 = trainer([resumed, probe2], STEPS + 2)
    t2.fit(module2, datamodule=datamodule(text_file), ckpt_path=str(ckpt))
    weights2 = _full_state(module2.model)
    if t.global_rank == 0:
        torch.save({
            "weights": weights, "weights_resumed": weights2, "steps": (probe.steps, probe2.steps),
            "global_steps": (t.global_step, t2.global_step),
            "grads_zero": probe.grads_zero + probe2.grads_zero, "types": sorted(probe.types),
            "start_sparsity": (pruning.start_sparsity, resumed.start_sparsity),
            "resumed_source": resumed.masks_source, "resumed_masks": resumed.masks, "refusal": refusal,
            "strategy": type(t.strategy).__name__, "world_size": t.world_size,
        }, out / "result.pt")


# --------------------------------------------------------------------------- tests
@pytest.fixture
def uneven_llama(tmp_path, tokenizer):
    """A tiny llama whose MLP width (129) does not split evenly over 2 ranks (shards of 65 and 64 rows)."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.intermediate_size = 129
    torch.manual_seed(0)
    d = tmp_path / "llama129"
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@torch.no_grad()
def _nll(module, dm) -> float:
    from wanda_pl.eval.perplexity import window_nll

    module.eval()
    ids = dm.calibration_ids()
    return float(window_nll(module(ids), ids).mean())


@pytest.mark.slow
def test_fsdp2_two_processes_keep_the_masks(uneven_llama, text_file, tmp_path, single_thread):
    from wanda_pl.modules.causal_lm import CausalLM

    reference = CausalLM(str(uneven_llama))
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(m.weight.shape, generator=gen) < 0.5 for n, m in reference.all_targets().items()}
    assert masks["model.layers.0.mlp.up_proj"].shape == (129, 64)
    torch.save(masks, tmp_path / "masks.pt")
    initial = {k: v.clone() for k, v in reference.model.state_dict().items()}
    with torch.no_grad():
        for name, mask in masks.items():
            reference.model.get_submodule(name).weight.masked_fill_(mask, 0)
    dm = datamodule(text_file)
    dm.prepare_for(reference)
    start_nll = _nll(reference, dm)  # the masked model before fine-tuning
    start_sparsity = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(uneven_llama), str(text_file), str(tmp_path / "masks.pt"),
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(out / "result.pt", weights_only=False)

    assert res["strategy"] == "ModelParallelStrategy" and res["world_size"] == 2
    assert res["global_steps"] == (STEPS, STEPS + 2) and res["steps"] == (STEPS, 2)
    assert res["types"] == [("DTensor", "DTensor")]  # the weights really were sharded
    assert res["grads_zero"] and all(res["grads_zero"])  # pruned gradients zeroed before every step
    # counted over both ranks, not one shard
    assert res["start_sparsity"][0] == pytest.approx(start_sparsity, abs=1e-12)
    assert res["start_sparsity"][1] == pytest.approx(start_sparsity, abs=1e-12)
    assert res["refusal"] is not None and "masks_from" in res["refusal"]
    # the checkpoint holds the full masks; resuming restores them
    meta = torch.load(out / "ckpt" / "meta.pt", weights_only=False)
    saved = meta["callbacks"]["Pruning"]["masks"]
    assert res["resumed_source"].startswith("checkpoint")
    for name, mask in masks.items():
        assert torch.equal(saved[name], mask) and torch.equal(res["resumed_masks"][name], mask), name

    for key in ("weights", "weights_resumed"):
        weights = res[key]
        for name, mask in masks.items():
            w = weights[f"{name}.weight"]
            assert w.shape == mask.shape
            assert torch.equal(w[mask], torch.zeros(int(mask.sum()))), (key, name)  # exactly zero, every shard
            assert not torch.equal(w[~mask], initial[f"{name}.weight"][~mask]), (key, name)  # the kept ones trained
    # fine-tuning lowered the loss of the masked model
    trained = CausalLM(str(uneven_llama))
    trained.model.load_state_dict(res["weights"])
    assert _nll(trained, dm) < start_nll
    trained.model.load_state_dict(res["weights_resumed"])
    assert _nll(trained, dm) < start_nll


def test_fsdp1_and_deepspeed_refused_pointing_to_model_parallel():
    from wanda_pl.training.masks import check_strategy

    def stub(name):
        return type("Stub", (), {"strategy": type(name, (), {})()})()

    for name in ("FSDPStrategy", "DeepSpeedStrategy"):
        with pytest.raises(NotImplementedError, match=f"{name} shards them.*ModelParallelStrategy"):
            check_strategy(stub(name))
    for name in ("ModelParallelStrategy", "DDPStrategy", "SingleDeviceStrategy"):
        check_strategy(stub(name))


def test_lightning_runs_fsdp1_on_gpus_only():
    """Why FSDP1 cannot be tested here: Lightning (and torch's FullyShardedDataParallel) want an accelerator."""
    import lightning as L

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fsdp")


@pytest.mark.slow
def test_fit_command_under_fsdp2_writes_a_whole_sparse_model(uneven_llama, text_file, tmp_path):
    """``cli.py fit`` end to end with ModelParallelStrategy on 2 processes, distilling from the dense
    model: the report counts over both ranks, the teacher is sharded like the student and every loss is
    reported, and the saved model is gathered whole, with every mask's zeros. (One run: a fit without
    distillation is this one less the teacher; FSDP2 training that keeps the masks is tested above.)"""
    distill = ("--distill.teacher", "dense", "--distill.loss", "squarehead")
    from wanda_pl.modules.causal_lm import CausalLM

    reference = CausalLM(str(uneven_llama))
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.weight.shape, generator=gen) < 0.5 for n, m in reference.all_targets().items()}
    torch.save(masks, tmp_path / "masks.pt")
    sparsity = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--model.name_or_path", str(uneven_llama),
           "--model.learning_rate", "0.01", "--model.weight_decay", "0.1",
           "--pruning.masks_from", str(tmp_path / "masks.pt"),
           "--data.calibration", str(text_file), "--data.evaluation", str(text_file),
           "--data.nsamples", str(NSAMPLES), "--data.seqlen", str(SEQLEN), "--data.max_eval_windows", "2",
           "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
           "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
           "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--output_dir", str(out), *distill]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "ModelParallelStrategy" and report["devices"] == 2 and report["steps"] == 3
    losses = report["distill"]["losses"]
    assert set(losses) == {"next_token", "kl", "feature", "distill", "feature_per_block"}
    assert losses["kl"]["first"] >= 0 and report["distill"]["tokens_seen"] == 3 * 2 * 2 * SEQLEN
    assert report["sparsity_before"] == pytest.approx(sparsity, abs=1e-12)
    assert report["sparsity_after"] == pytest.approx(sparsity, abs=1e-12)
    assert report["masks"]["nonzero_at_pruned_positions"] == 0
    assert report["metrics"]["ppl"]["after"] < report["metrics"]["ppl"]["before"]
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    for name, mask in masks.items():
        w = saved.get_submodule(name).weight
        assert w.shape == mask.shape and bool((w[mask] == 0).all()), name
    assert not torch.equal(saved.model.layers[0].mlp.up_proj.weight,
                           reference.model.model.layers[0].mlp.up_proj.weight.masked_fill(masks["model.layers.0.mlp.up_proj"], 0))


def test_lora_under_fsdp2_is_refused(uneven_llama):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM(str(uneven_llama), finetune="lora")
    module._trainer = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(NotImplementedError, match="lora under ModelParallelStrategy"):
        module.configure_model()
    module._trainer = SimpleNamespace(strategy=SimpleNamespace())  # any other strategy: nothing to shard
    module.configure_model()
    assert not any(type(p).__name__ == "DTensor" for p in module.model.parameters())


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
