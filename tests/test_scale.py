"""Scale: offloaded pruning (cpu, disk) equals the resident one bit for bit, block-sequential
perplexity equals the plain one, batched calibration gives batch-1 masks, device maps are checked."""
from types import SimpleNamespace

import pytest
import torch

from wanda_pl.callbacks import Calibration, Pruning
from wanda_pl.core.distributed import check_calibration_shares, share, shares
from wanda_pl.errors import UserError
from wanda_pl.families.hf_causal import blockwise_logits, check_device_map
from wanda_pl.modules.causal_lm import CausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NSAMPLES, SEQLEN = 6, 24


def calib_ids(n=NSAMPLES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SEQLEN), generator=g)


def prune(module, method, ids, batch_size=None, ratio=0.5, **knobs):
    dm = SimpleNamespace(calibration_data=lambda: ids)
    calibration = Calibration(batch_size=batch_size)
    trainer = SimpleNamespace(callbacks=[calibration], is_global_zero=False, datamodule=dm, global_rank=0, world_size=1)
    pruning = Pruning(method, sparsity_ratio=ratio, **knobs)
    pruning.prune(trainer, module)
    return pruning


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "opt", "gemma2", "mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offload_cpu_and_disk_equal_resident(tiny_dirs, tmp_path, family, method):
    from transformers import AutoModelForCausalLM

    ids = calib_ids()
    resident = CausalLM(str(tiny_dirs[family]))
    want = prune(resident, method, ids)
    host = CausalLM(str(tiny_dirs[family]), offload="cpu")
    got_cpu = prune(host, method, ids)
    disk = CausalLM(str(tiny_dirs[family]), offload="disk")
    assert all(p.is_meta for p in disk.model.model.layers.parameters()) if family != "opt" else True
    disk.disk.write_to(tmp_path / "out")
    got_disk = prune(disk, method, ids)
    disk.disk.finish()
    assert list(want.masks) == list(got_cpu.masks) == list(got_disk.masks)
    for name in want.masks:
        assert torch.equal(want.masks[name], got_cpu.masks[name]), name
        assert torch.equal(want.masks[name], got_disk.masks[name]), name
    ref, cpu = state(resident.model), state(host.model)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert set(written) == set(ref)
    for key in ref:
        assert torch.equal(ref[key], cpu[key]), key
        assert torch.equal(ref[key], written[key]), key
    # the blocks were given back after their turn: nothing of them is held any more
    assert all(p.is_meta for _, b in disk.prunable_blocks(None)[0] for p in b.parameters())
    assert disk.disk.overall_sparsity(disk.all_targets()) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_blockwise_perplexity_equals_whole_model(tiny_dirs, tmp_path, family):
    resident = CausalLM(str(tiny_dirs[family]))
    batches = list(calib_ids(5, seed=1).split(2))  # a smaller last batch too
    want = [resident(b) for b in batches]
    for offload in ("cpu", "disk"):
        module = CausalLM(str(tiny_dirs[family]), offload=offload)
        got = list(blockwise_logits(module.model, batches, module.placement(), "cpu"))
        assert len(got) == len(want)
        for (ids, logits), b, w in zip(got, batches, want):
            assert torch.equal(ids, b)
            assert torch.equal(logits, w), offload


def test_offloaded_validation_through_lightning(tiny_dirs, text_file):
    import lightning as L

    from wanda_pl.data.text_module import TextDataModule

    ppl = {}
    for offload in ("none", "cpu", "disk"):
        module = CausalLM(str(tiny_dirs["llama"]), offload=offload)
        dm = TextDataModule(str(text_file), str(text_file), nsamples=4, seqlen=32, seed=3, max_eval_windows=3)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(module, datamodule=dm, verbose=False)
        ppl[offload] = module.validation_metrics()["ppl"]
        if offload != "none":  # Lightning never held the weights: they stayed where the offload keeps them
            assert "model" not in module._modules
    assert ppl["none"] == ppl["cpu"] == ppl["disk"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_batched_calibration_gives_the_batch_one_masks(tiny_dirs, method):
    ids = calib_ids(8)
    one = prune(CausalLM(str(tiny_dirs["llama"])), method, ids, batch_size=1)
    four = prune(CausalLM(str(tiny_dirs["llama"])), method, ids, batch_size=4)
    three = prune(CausalLM(str(tiny_dirs["llama"])), method, ids, batch_size=3)  # 3 + 3 + 2
    total = agree = agree3 = 0
    for name, m in one.masks.items():
        total += m.numel()
        agree += int((m == four.masks[name]).sum())
        agree3 += int((m == three.masks[name]).sum())
    # the statistics are the same sums in another float order: a near-tie may flip, nothing more
    assert agree / total >= 0.9999 and agree3 / total >= 0.9999, (agree / total, agree3 / total)


def test_batched_inputs_hold_the_samples(tiny_dirs):
    module = CausalLM(str(tiny_dirs["llama"]))
    _, inputs = module.prunable_blocks(calib_ids(7), "cpu", batch_size=3)
    assert [inp.hidden.shape[0] for inp in inputs] == [3, 3, 1]
    with pytest.raises(ValueError, match="calibration.batch_size"):
        Calibration(batch_size=0)


def test_shares_are_disjoint_and_complete():
    got = [list(share(7, r, 3)) for r in range(3)]
    assert got == [[0, 3, 6], [1, 4], [2, 5]] and shares(7, 3) == [3, 2, 2]
    assert shares(2, 3) == [1, 1, 0]  # evaluation windows may leave a rank empty
    with pytest.raises(ValueError, match="2 calibration samples for 3 ranks"):
        check_calibration_shares(2, 3)  # calibration may not


def test_bad_offload_input(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="model.offload must be one of none, cpu, disk"):
        CausalLM(str(tiny_dirs["llama"]), offload="gpu")
    with pytest.raises(ValueError, match="use one of them"):
        CausalLM(str(tiny_dirs["llama"]), offload="cpu", device_map="auto")
    # a .bin checkpoint cannot be read block by block
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    model.config.save_pretrained(folder)
    with pytest.raises(UserError, match="safetensors"):
        CausalLM(str(folder), offload="disk")


def test_device_map_naming_a_missing_device_is_refused(tiny_dirs):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"names device '{missing}', which is not here"):
        check_device_map({"": missing})
    with pytest.raises(ValueError, match="which is not here"):
        CausalLM(str(tiny_dirs["llama"]), device_map={"model": missing})
    with pytest.raises(ValueError, match="model.device_map must be"):
        check_device_map(3.5)
    check_device_map("auto")
    module = CausalLM(str(tiny_dirs["llama"]), device_map={"": "cpu"})
    assert "model" not in module._modules  # accelerate placed it: Lightning must not move it
    assert module.describe()["device_map"] == {"": "cpu"}


def test_offload_refuses_what_needs_the_whole_model(tiny_dirs):
    from wanda_pl.callbacks import ZeroShot

    module = CausalLM(str(tiny_dirs["llama"]), offload="cpu")
    with pytest.raises(UserError, match="zero-shot evaluation needs the whole model"):
        ZeroShot(enabled=True).setup(None, module, "validate")
    module._trainer = SimpleNamespace(world_size=1)
    with pytest.raises(UserError, match="fine-tuning needs the whole model.*FSDP2"):
        module.setup("fit")


def test_each_block_is_present_only_for_its_turn(tiny_dirs):
    """The engine asks for a block just before it runs and gives it back right after: at most one
    block is ever in, and every forward of a block happens while it is in."""
    from wanda_pl.core.onload import HostOffload

    module = CausalLM(str(tiny_dirs["llama"]), offload="cpu")
    events, present = [], set()

    class Recording(HostOffload):
        def enter(self, name, block):
            assert not present, f"{name} entered while {present} still in"
            present.add(name)
            events.append(("enter", name))
            super().enter(name, block)

        def leave(self, name, block, pruned):
            present.discard(name)
            events.append(("leave", name, pruned))
            super().leave(name, block, pruned)

    blocks, _ = module.prunable_blocks(None)
    for name, block in blocks:
        block.register_forward_pre_hook(lambda mod, args, name=name: events.append(("run", name, name in present)))
    module.placement = lambda: Recording("cpu")
    prune(module, "wanda", calib_ids(4), batch_size=2)
    first = events.index(("enter", blocks[0][0]))
    # capturing the first block's inputs calls the blocks as stand-ins (their weights unused: the
    # offload=disk tests run them on the meta device); every real forward happens while the block is in
    runs = [e for e in events[first:] if e[0] == "run"]
    assert len(runs) == 2 * 2 * len(blocks) and all(inside for _, _, inside in runs)  # 2 batches x 2 passes
    turns = [e for e in events if e[0] != "run"]
    assert turns == [t for name, _ in blocks for t in (("enter", name), ("leave", name, True))]


def test_fewer_samples_than_ranks_is_refused_before_work(tiny_dirs, text_file, tmp_path):
    from conftest import run_cli

    error, out = run_cli(["prune", "--model.name_or_path", str(tiny_dirs["llama"]), "--data.calibration", str(text_file),
                          "--data.evaluation", str(text_file), "--data.nsamples", "1", "--data.seqlen", "16",
                          "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                          "--output_dir", str(tmp_path / "out")])
    assert error is not None and "1 calibration samples for 2 ranks" in error, error
    assert "dense baseline" not in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,knobs", [
    ("admm", {}), ("wanda", {"refine": "dsnot"}), ("wanda", {"update": "admm"}),
    ("wanda", {"allocation": "owl", "owl_lambda": 0.05}), ("ria", {}),
])
def test_the_steps_beyond_the_paper_offload_alike(tiny_dirs, tmp_path, method, knobs):
    """OWL's dense pass, DSnoT, ADMM and RIA read their blocks through the same placement."""
    from transformers import AutoModelForCausalLM

    ids = calib_ids()
    resident = CausalLM(str(tiny_dirs["llama"]))
    want = prune(resident, method, ids, **knobs)
    disk = CausalLM(str(tiny_dirs["llama"]), offload="disk")
    disk.disk.write_to(tmp_path / "out")
    got = prune(disk, method, ids, **knobs)
    disk.disk.finish()
    assert want.result.plan == got.result.plan
    for name in want.masks:
        assert torch.equal(want.masks[name], got.masks[name]), name
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for key, value in resident.model.state_dict().items():
        assert torch.equal(value, written[key]), key


def test_disk_output_reloads_with_the_reported_perplexity(tiny_dirs, text_file, tmp_path):
    import json

    import lightning as L

    from conftest import run_cli
    from wanda_pl.data.text_module import TextDataModule

    out = tmp_path / "out"
    error, _ = run_cli(["prune", "--model.name_or_path", str(tiny_dirs["gemma2"]), "--model.offload", "disk",
                        "--data.calibration", str(text_file), "--data.evaluation", str(text_file),
                        "--data.nsamples", "4", "--data.seqlen", "32", "--data.max_eval_windows", "3",
                        "--pruning.method", "sparsegpt", "--trainer.accelerator", "cpu", "--output_dir", str(out)])
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    assert report["offload"] == "disk" and report["calibration_samples_per_rank"] == [4]
    files = {p.name for p in (out / "model").iterdir()}
    assert {"model.safetensors.index.json", "config.json", "README.md"} <= files  # kept without --save_model
    assert not (tmp_path / ".out.wanda_pl-resume").exists()
    module = CausalLM(str(out / "model"))  # a plain from_pretrained of what was written block by block
    dm = TextDataModule(str(text_file), str(text_file), nsamples=4, seqlen=32, seed=0, max_eval_windows=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert module.validation_metrics()["ppl"] == pytest.approx(report["metrics"]["ppl"]["pruned"], rel=1e-6)
    sparsity = [float((m.weight == 0).float().mean()) for m in module.all_targets().values()]
    assert report["actual_sparsity"] == pytest.approx(sum(sparsity) / len(sparsity), abs=1e-3)
    # coverage, counted on disk while the blocks were not in memory, is what the written model holds
    from wanda_pl.training.sharding import weight_sparsity

    assert weight_sparsity(module, module.all_targets()) == {k: report[k] for k in (
        "target_coverage", "sparsity_block_weights", "sparsity_model")}
    # the masks, one file per block (never all in memory while pruning), read back as one set
    from wanda_pl.training.masks import load_masks

    assert len(list((out / "masks").glob("masks-*-of-00002.pt"))) == 2
    masks = load_masks(out, {n: m.weight for n, m in module.all_targets().items()})
    assert set(masks) == set(module.all_targets())
    for name, m in module.all_targets().items():
        assert torch.equal(masks[name], m.weight == 0), name  # SparseGPT's pruned weights are exactly its zeros


def test_a_sweep_refuses_an_offloaded_model(tiny_dirs, text_file, tmp_path):
    from conftest import run_cli

    error, _ = run_cli(["sweep", "--model.name_or_path", str(tiny_dirs["llama"]), "--model.offload", "cpu",
                        "--data.calibration", str(text_file), "--data.evaluation", str(text_file),
                        "--data.nsamples", "2", "--data.seqlen", "16", "--output_dir", str(tmp_path / "sweep")])
    assert error is not None and "sweep keeps the dense weights in memory" in error, error
    assert not (tmp_path / "sweep").exists()
