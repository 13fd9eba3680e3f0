"""Block-level reconstruction (``--pruning.reconstruct block|attn_mlp``): masks never change, pruned
weights stay exactly zero, each block's output error on its calibration inputs goes down against the
layer-wise result, deterministic, and offloaded runs equal the resident one."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from wanda_pl.callbacks import Calibration, Pruning
from wanda_pl.core.reconstruct import Reconstruction
from wanda_pl.modules.causal_lm import CausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(seed, n=6, seqlen=24):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _prune(module, ids, **kw):
    dm = SimpleNamespace(calibration_data=lambda: ids)
    trainer = SimpleNamespace(callbacks=[Calibration()], is_global_zero=False, datamodule=dm, global_rank=0,
                              world_size=1)
    pruning = Pruning("wanda", sparsity_ratio=0.5, **kw)
    pruning.prune(trainer, module)
    return pruning


def _block_errors(folder, pruned, ids):
    """Each block's output error, dense block vs pruned block on the pruned model's own inputs."""
    dense = CausalLM(str(folder))
    errors = []
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, kw, o, i=i: seen.setdefault(i, []).append((a, kw)),
                                     with_kwargs=True) for i, b in enumerate(pruned.model.model.layers)]
    with torch.no_grad():
        pruned.model(input_ids=ids)
        for h in hooks:
            h.remove()
        for i, (db, pb) in enumerate(zip(dense.model.model.layers, pruned.model.model.layers)):
            total = 0.0
            for args, kwargs in seen[i]:
                d, p = db(*args, **kwargs), pb(*args, **kwargs)
                d, p = (x[0] if isinstance(x, tuple) else x for x in (d, p))
                total += float((d - p).pow(2).mean())
            errors.append(total)
    return errors


@pytest.mark.parametrize("mode", ["block", "attn_mlp"])
@pytest.mark.parametrize("seed", [0, 1])
def test_masks_unchanged_zeros_kept_and_each_block_closer_to_dense(tiny_dirs, mode, seed):
    ids = _ids(seed)
    plain = CausalLM(str(tiny_dirs["llama"]))
    layerwise = _prune(plain, ids)
    fitted = CausalLM(str(tiny_dirs["llama"]))
    rec = _prune(fitted, ids, reconstruct=mode, reconstruct_steps=30, reconstruct_lr=1e-3)
    assert list(rec.masks) == list(layerwise.masks)
    for name, mask in rec.masks.items():
        if name.startswith("model.layers.0."):  # same inputs: the layer-wise method's mask, untouched
            assert torch.equal(mask, layerwise.masks[name]), name
        assert bool((mask.sum(1) == mask.shape[1] // 2).all()), name  # later blocks: their own, still exact
        w = fitted.model.get_submodule(name).weight
        assert bool((w[mask] == 0).all()), name  # pruned stays exactly zero
        assert int((w == 0).sum()) == int(mask.sum()), name  # and no kept weight was fitted to zero
    moved = [n for n in layerwise.masks if not torch.equal(fitted.model.get_submodule(n).weight,
                                                            plain.model.get_submodule(n).weight)]
    assert moved  # kept weights were fitted
    for n, p in fitted.model.named_parameters():  # nothing else moved: norms, embeddings, head
        if not any(n.startswith(t) for t in layerwise.masks):
            assert torch.equal(p, dict(plain.model.named_parameters())[n]), n
    before, after = _block_errors(tiny_dirs["llama"], plain, ids), _block_errors(tiny_dirs["llama"], fitted, ids)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    report = rec.result.reconstruction
    assert all(v["after"] < v["before"] for v in report.values())


def test_deterministic_and_offload_cpu_and_disk_equal_the_resident_run(tiny_dirs, tmp_path):
    ids = _ids(2)
    runs = {}
    for offload in ("none", "none-again", "cpu", "disk"):
        module = CausalLM(str(tiny_dirs["llama"]), offload=offload.split("-")[0])
        if offload == "disk":
            module.disk.write_to(tmp_path / "out")
        runs[offload] = _prune(module, ids, reconstruct="attn_mlp", reconstruct_steps=5, reconstruct_lr=1e-3)
        if offload == "disk":
            module.disk.finish()
            from transformers import AutoModelForCausalLM

            runs["disk-weights"] = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
        else:
            runs[offload + "-weights"] = {k: v.clone() for k, v in module.model.state_dict().items()}
    want = runs["none-weights"]
    for other in ("none-again", "cpu", "disk"):
        got = runs[f"{other}-weights"]
        assert all(torch.equal(want[k], got[k]) for k in want), other
        assert runs[other].result.reconstruction == runs["none"].result.reconstruction


def test_moe_experts_are_fitted_with_every_expert_mask_kept(tiny_dirs):
    ids = _ids(3)
    module = CausalLM(str(tiny_dirs["mixtral"]))
    pruning = _prune(module, ids, reconstruct="block", reconstruct_steps=5, reconstruct_lr=1e-3)
    experts = module.model.model.layers[0].mlp.experts
    for e in range(4):
        for param in ("gate_up_proj", "down_proj"):
            mask = pruning.masks[f"model.layers.0.mlp.experts.{param}.{e}"]
            assert bool((getattr(experts, param)[e][mask] == 0).all())
    assert all(v["after"] <= v["before"] for v in pruning.result.reconstruction.values())


def _dense_block_outputs(folder, ids):
    """Each block's output in the dense model's own forward (the dense stream)."""
    dense, seen = CausalLM(str(folder)), {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, []).append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(dense.model.model.layers)]
    with torch.no_grad():
        for row in ids.split(1):
            dense.model(input_ids=row)
    for h in hooks:
        h.remove()
    return seen


def test_a_dense_target_fits_each_block_to_the_dense_models_own_outputs(tiny_dirs):
    """``reconstruct_target dense``: block 0 sees the same inputs either way (same fit, same error); from
    block 1 on the target is the dense model's own block output, so the fitted block ends closer to
    it than the ``pruned`` target's fit does, with the masks and zeros kept the same way."""
    ids = _ids(4)
    fits = {}
    for target in ("pruned", "dense"):
        module = CausalLM(str(tiny_dirs["llama"]))
        fits[target] = (module, _prune(module, ids, reconstruct="block", reconstruct_steps=40, reconstruct_lr=3e-3,
                                       reconstruct_target=target))
    (p_mod, p_run), (d_mod, d_run) = fits["pruned"], fits["dense"]
    assert p_run.result.reconstruction["model.layers.0"] == d_run.result.reconstruction["model.layers.0"]
    assert p_run.result.reconstruction["model.layers.1"] != d_run.result.reconstruction["model.layers.1"]
    assert p_run.describe()["reconstruct_target"] == "pruned" and d_run.describe()["reconstruct_target"] == "dense"
    for name, mask in d_run.masks.items():
        assert bool((d_mod.model.get_submodule(name).weight[mask] == 0).all()), name
    dense_out = _dense_block_outputs(tiny_dirs["llama"], ids)[1]

    def last_block_error(module):  # the model's own block-1 output against the dense model's
        seen = []
        h = module.model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            for row in ids.split(1):
                module.model(input_ids=row)
        h.remove()
        return sum(float((s - d).pow(2).mean()) for s, d in zip(seen, dense_out))

    assert last_block_error(d_mod) < last_block_error(p_mod)


def test_bad_reconstruction_settings_are_refused():
    for kw, message in ((dict(mode="all"), "pruning.reconstruct must be one of none, block, attn_mlp"),
                        (dict(mode="block", steps=0), "reconstruct_steps must be an integer >= 1"),
                        (dict(mode="block", lr=0), "reconstruct_lr must be > 0"),
                        (dict(mode="block", batch=0), "reconstruct_batch must be an integer >= 1"),
                        (dict(mode="block", target="teacher"), "reconstruct_target must be one of pruned, dense")):
        with pytest.raises(ValueError, match=message):
            Reconstruction(**kw)


def test_cli_reports_the_reconstruction(tiny_dirs, text_file, tmp_path):
    from test_cli import base_args

    out = tmp_path / "out"
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out, "--pruning.method", "wanda", "--pruning.reconstruct",
                                 "block", "--pruning.reconstruct_steps", "3"))
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    assert report["reconstruct"] == "block" and report["reconstruct_steps"] == 3
    assert set(report["reconstruction"]) == {"model.layers.0", "model.layers.1"}
    # a killed and resumed run (its fitted blocks from the checkpoints): tests/test_resume.py


@pytest.mark.slow
def test_two_data_parallel_ranks_fit_one_model(tiny_dirs, text_file, tmp_path):
    """Each rank fits on its share with the gradients averaged over ranks every step: the ranks' weights
    stay equal (the next block's masks are checked equal on every rank by the run itself), every block
    gets closer to dense, the saved model holds every mask's zeros."""
    from transformers import AutoModelForCausalLM

    from test_ddp import run

    report = run(tiny_dirs["llama"], text_file, tmp_path / "two", "--pruning.reconstruct", "attn_mlp",
                 "--pruning.reconstruct_steps", "5", "--pruning.reconstruct_lr", "1e-3",
                 "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert report["devices"] == 2 and report["calibration_samples_per_rank"] == [3, 2]
    assert all(v["after"] < v["before"] for v in report["reconstruction"].values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
    masks = torch.load(tmp_path / "two" / "masks.pt", weights_only=True)
    for name, mask in masks.items():
        assert torch.equal(model.get_submodule(name).weight == 0, mask), name


def test_a_dense_target_refuses_to_resume_midway(tiny_dirs):
    from wanda_pl.core.engine import prune_sequential
    from wanda_pl.core.sparsity import SparsitySpec
    from wanda_pl.methods import get_method

    module = CausalLM(str(tiny_dirs["llama"]))
    blocks, inputs = module.prunable_blocks(_ids(5))
    rec = Reconstruction("block", steps=2, target="dense")
    with pytest.raises(ValueError, match="reconstruct_target dense cannot resume"):
        prune_sequential(blocks, inputs, module.block_targets, get_method("wanda"), SparsitySpec(0.5), start=1,
                         progress=False, reconstruct=rec)
    result = prune_sequential(blocks, inputs, module.block_targets, get_method("wanda"), SparsitySpec(0.5),
                              progress=False, reconstruct=rec)  # from the start: fine
    assert set(result.reconstruction) == {"model.layers.0", "model.layers.1"}


@pytest.mark.parametrize("part", ["block", "mlp"])
def test_calls_joined_into_one_forward_give_the_per_call_loss_and_gradients(tiny_dirs, part):
    """A step's calls run as one forward on their samples together: the same mean loss and the same
    gradients as one forward per call (equal sample counts), and a differing non-batch value makes
    the calls run one by one instead of being merged wrongly."""
    from wanda_pl.core.reconstruct import _mse, joined, record_calls

    module = CausalLM(str(tiny_dirs["llama"]))
    layer = module.model.model.layers[1]
    target_module = layer if part == "block" else layer.mlp
    with torch.no_grad(), record_calls({"x": target_module}, "cpu") as calls:
        for row in _ids(3, n=3).split(1):
            module.model(input_ids=row)
    calls = [(a, k, t + 0.1 * torch.randn_like(t)) for a, k, t in calls["x"]]  # a target to fit
    together = joined(calls)
    assert together is not None and together[2].shape[0] == 3

    def grads(loss_fn):
        target_module.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in target_module.parameters() if p.grad is not None]

    one, g_one = grads(lambda: _mse(target_module, *together, "cpu"))
    each, g_each = grads(lambda: sum(_mse(target_module, a, k, t, "cpu") for a, k, t in calls) / len(calls))
    assert one == pytest.approx(each, rel=1e-5)
    assert len(g_one) == len(g_each) > 0
    for a, b in zip(g_one, g_each):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a value that is neither per sample nor the same in every call: not joined; the same in each: passed once
    def with_extra(n):
        return calls[0][0], {**calls[0][1], "extra": torch.arange(5) + n}, calls[0][2]

    assert joined([with_extra(0), with_extra(1)]) is None
    both = joined([with_extra(0), with_extra(0)])
    assert both[2].shape[0] == 2 and torch.equal(both[1]["extra"], torch.arange(5))
