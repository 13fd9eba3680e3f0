"""Vision metrics against a slow per-image count (one process, two simulated ranks); the
Classifier's validation metrics and its dense reference (one device, and two: real collectives)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from test_vision import ROOT, _block_linears, _tiny_vit, _trainer, image_root  # noqa: F401 (a fixture)
from wanda_pl.eval.vision import Agreement, pad_to_longest, top_k_accuracy, validation_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slow_metrics(logits, labels, indices, reference):
    """Every number the obvious way: one image at a time, Python lists and dicts."""
    top1, top5, label = {}, {}, {}
    for row, lab, idx in zip(logits.tolist(), labels.tolist(), indices.tolist()):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        top1[idx], top5[idx], label[idx] = order[0], order[:5], lab
    labelled = [i for i in top1 if label[i] >= 0]
    ref = [] if reference is None else reference.tolist()
    both = [i for i in top1 if len(ref) == max(top1) + 1 and ref[i] >= 0]
    unl = [i for i in both if label[i] < 0]
    return {"top1": sum(top1[i] == label[i] for i in labelled) / len(labelled) if labelled else None,
            "top5": sum(label[i] in top5[i] for i in labelled) / len(labelled) if labelled else None,
            "images": len(top1), "labelled": len(labelled), "top1_correct": sum(top1[i] == label[i] for i in labelled),
            "agreement": sum(top1[i] == ref[i] for i in both) / len(both) if both else None,
            "agreement_unlabelled": sum(top1[i] == ref[i] for i in unl) / len(unl) if unl else None}


def random_run(seed, classes, n=40):
    """Logits, labels (some -1) and dataset indices in shuffled order; every 7th index never seen
    (a hole) but the last, so that every run covers indices 0 .. n - 1."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.tensor([i for i in range(n) if i % 7 != 3 or i == n - 1])
    indices = indices[torch.randperm(len(indices), generator=g)]
    return torch.randn(len(indices), classes, generator=g), torch.randint(-1, classes, indices.shape, generator=g), indices


def perturbed(run, seed, drop=5):
    """The same images with a third of the logits redrawn (some top-1 classes move), and the
    image of index ``drop`` not evaluated (other holes than the reference's)."""
    logits, labels, indices = (t.clone() for t in run)
    logits[::3] = torch.randn(logits[::3].shape, generator=torch.Generator().manual_seed(seed + 1000))
    keep = indices != drop
    return logits[keep], labels[keep], indices[keep]


def metric_results(runs, reference=None, classes=7):
    """The package's metrics over ``runs`` (batches of (logits, labels, indices)) in one process."""
    top1, top5, images = top_k_accuracy(classes, 1), top_k_accuracy(classes, 5), Agreement()
    images.reference = reference
    for logits, labels, indices in runs:
        for metric, args in ((top1, (logits, labels)), (top5, (logits, labels)), (images, (logits, labels, indices))):
            metric.update(*args)
    return validation_results(top1, top5, images)


def batches(run, size=6):
    return list(zip(*(t.split(size) for t in run)))


def assert_same(got, want):
    assert list(got) == ["top1", "top5", "images", "labelled", "top1_correct", "agreement", "agreement_unlabelled"]
    for key in ("images", "labelled", "top1_correct", "agreement", "agreement_unlabelled"):
        assert got[key] == want[key], (key, got, want)  # counts and Python-float ratios: exact
    for key in ("top1", "top5"):  # torchmetrics' float32, rounded to 6 places
        assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)


def reference_of(run):
    metric = Agreement()
    for batch in batches(run):
        metric.update(*batch)
    metric.keep_as_reference()
    return metric.reference


# --------------------------------------------------------------------------- the metric alone


@pytest.mark.parametrize("classes", [3, 7])  # 3: top-5 capped at the class count
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_a_slow_count(seed, classes):
    dense_run = random_run(seed, classes)
    reference = reference_of(dense_run)
    seen = dict(zip(dense_run[2].tolist(), dense_run[0].argmax(-1).tolist()))
    assert reference.tolist() == [seen.get(i, -1) for i in range(40)] and -1 in reference.tolist()
    assert_same(metric_results(batches(dense_run), reference, classes), slow_metrics(*dense_run, reference))
    pruned_run = perturbed(dense_run, seed)
    got = metric_results(batches(pruned_run), reference, classes)
    assert_same(got, slow_metrics(*pruned_run, reference))
    assert 0 < got["agreement"] < 1 and got["labelled"] < got["images"]
    assert_same(metric_results(batches(pruned_run), None, classes), slow_metrics(*pruned_run, None))


def two_ranks():
    """Two Agreement metrics that sync through torchmetrics' own code with an in-process gather:
    each rank's state at its own length (as ``gather_all_tensors`` returns them), then padded."""
    ranks = [Agreement(distributed_available_fn=lambda: True) for _ in range(2)]
    for me in ranks:
        def gather(tensor, group=None, me=me):
            name = next(n for n in ("top1", "label") if getattr(me, n) is tensor)
            return pad_to_longest([getattr(r, name) for r in ranks])
        me.dist_sync_fn = gather
    return ranks


@pytest.mark.parametrize("seed", [0, 3])
def test_two_ranks_give_the_one_process_numbers(seed):
    dense_run, pruned_run = random_run(seed, 7), perturbed(random_run(seed, 7), seed)
    reference, want = reference_of(dense_run), slow_metrics(*pruned_run, reference_of(dense_run))

    def split(run, rank):  # each image on one rank; rank 0's highest index is far below rank 1's
        mine = (run[2] < 17) if rank == 0 else (run[2] >= 17)
        return tuple(t[mine] for t in run)

    ranks = two_ranks()
    for rank, metric in enumerate(ranks):
        for batch in batches(split(dense_run, rank)):
            metric.update(*batch)
    assert ranks[0].top1.numel() < ranks[1].top1.numel() == 40  # the padding is needed
    for metric in ranks:
        metric.keep_as_reference()  # every rank calls the collective
        assert torch.equal(metric.reference, reference)
    for metric in ranks:
        metric.reset()
    assert all(m.top1.numel() == 0 and m.reference is not None for m in ranks)  # reset keeps the reference
    accuracies = [(top_k_accuracy(7, 1), top_k_accuracy(7, 5)) for _ in ranks]
    for rank, metric in enumerate(ranks):
        for logits, labels, indices in batches(split(pruned_run, rank)):
            metric.update(logits, labels, indices)
            for accuracy in accuracies[rank]:
                accuracy.update(logits, labels)
    for metric in ranks:
        assert metric.compute() == {k: want[k] for k in metric.compute()}
    # merge_state: a user merging two processes' metrics by hand
    ranks[0].distributed_available_fn = lambda: False
    ranks[0].merge_state(ranks[1])
    for mine, theirs in zip(*accuracies):
        mine.merge_state(theirs)
    assert_same(validation_results(*accuracies[0], ranks[0]), want)


def test_a_changed_evaluation_set_gives_no_agreement(caplog):
    metric = Agreement()
    metric.update(torch.eye(3), torch.tensor([0, 1, -1]), torch.tensor([0, 1, 2]))
    metric.keep_as_reference()
    assert (metric.compute()["agreement"], metric.compute()["agreement_unlabelled"]) == (1.0, 1.0)
    metric.reset()
    metric.update(torch.eye(3)[:2], torch.tensor([0, 0]), torch.tensor([0, 3]))  # 4 indices now
    with caplog.at_level("WARNING"):
        got = metric.compute()
    assert got["agreement"] is None and got["agreement_unlabelled"] is None and "evaluation set changed" in caplog.text
    assert (got["images"], got["labelled"], got["top1_correct"]) == (2, 2, 1)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metric.compute()
    assert empty["images"] == 0 and empty["agreement"] is None  # nothing seen: size 0


# --------------------------------------------------------------------------- the Classifier's validation metrics


def _hand_predictions(module, dm):
    from wanda_pl.data.image_files import load_image

    items = dm.evaluation_items()
    images = torch.stack([load_image(p, dm.transform) for p, _ in items])
    with torch.no_grad():
        logits = module(images)
    return logits, torch.tensor([label for _, label in items])


def test_accuracy_and_agreement_equal_a_hand_count(image_root):
    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.data.images import ImageFolderDataModule

    module = _tiny_vit(num_classes=6, seed=2)  # a seed whose random predictions are not all one class
    dm = ImageFolderDataModule(root=str(image_root), nsamples=8, batch_size=3, unlabelled=str(image_root / "extra"))
    dm.prepare_for(module)
    pruning = Pruning(method="wanda", sparsity_ratio=0.6)
    trainer = _trainer(callbacks=[pruning, Calibration(propagate=False)])
    logits, labels = _hand_predictions(module, dm)
    dense_top1 = logits.argmax(-1)
    lab = labels >= 0
    trainer.validate(module, datamodule=dm, verbose=False)
    dense = dict(module.validation_metrics())
    assert dense["images"] == 10 and dense["labelled"] == 7
    assert len(set(dense_top1.tolist())) > 1  # a non-degenerate count
    assert dense["top1_correct"] == int((dense_top1[lab] == labels[lab]).sum())
    assert dense["top1"] == pytest.approx(float((dense_top1[lab] == labels[lab]).float().mean()), abs=1e-6)
    top5 = (logits.topk(5, -1).indices[lab] == labels[lab, None]).any(-1).float().mean()
    assert dense["top5"] == pytest.approx(float(top5), abs=1e-6)
    assert dense["agreement"] == 1.0

    pruning.enabled = True
    trainer.validate(module, datamodule=dm, verbose=False)
    pruned = dict(module.validation_metrics())
    assert pruning.masks and set(pruning.masks) == _block_linears(2)
    logits2, _ = _hand_predictions(module, dm)
    top1 = logits2.argmax(-1)
    assert pruned["top1"] == pytest.approx(float((top1[lab] == labels[lab]).float().mean()), abs=1e-6)
    assert pruned["agreement"] == pytest.approx(float((top1 == dense_top1).float().mean()), abs=1e-6)
    assert pruned["agreement_unlabelled"] == pytest.approx(float((top1[~lab] == dense_top1[~lab]).float().mean()), abs=1e-6)
    assert 0.0 < pruned["agreement"] < 1.0  # 60% of every block linear is gone: some predictions moved

    from wanda_pl.commands.steps import Evaluation
    from wanda_pl.commands.report import measured

    results = {**measured(Evaluation(dense), Evaluation(pruned)), **module.measured_on(pruned)}
    assert results["metrics"]["top1"] == {"dense": dense["top1"], "pruned": pruned["top1"]}
    assert set(results["metrics"]) == {"top1", "top5", "agreement", "agreement_unlabelled"}
    assert results["eval_counts"] == {"images": 10, "labelled": 7}
    pct = {k: {side: f"{100 * m[k]:.2f}%" for side, m in (("dense", dense), ("pruned", pruned))} for k in ("top1", "top5")}
    assert module.metrics_line(dense, pruned) == (  # the console line as before metrics were declared
        f"top-1 dense {pct['top1']['dense']}, pruned {pct['top1']['pruned']}; top-5 dense {pct['top5']['dense']}, "
        f"pruned {pct['top5']['pruned']}; agreement {100 * pruned['agreement']:.2f}% over 10 images")


def test_a_module_given_masks_stores_no_dense_reference():
    """The reference comes from the first validation of an unpruned model; set_masks (the Pruning
    callback calls it whenever it applies masks) marks the model pruned."""
    from torch.utils.data import DataLoader, TensorDataset

    module, trainer = _tiny_vit(num_classes=6, seed=2), _trainer()
    images = torch.randint(0, 256, (9, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 2, 3, 4, 5, -1, -1, 0]), torch.arange(9)), batch_size=4)
    fc1 = module.model.blocks[0].mlp.fc1
    module.set_masks({"blocks.0.mlp.fc1": torch.zeros_like(fc1.weight, dtype=torch.bool)})
    trainer.validate(module, dataloaders=loader, verbose=False)
    first = module.validation_metrics()
    assert module.reference is None and first["agreement"] is None and first["agreement_unlabelled"] is None
    assert (first["images"], first["labelled"]) == (9, 7)

    module.set_masks({})  # dense again: this run stores the reference
    trainer.validate(module, dataloaders=loader, verbose=False)
    with torch.no_grad():
        dense_top1 = module(images).argmax(-1)
        fc1.weight.zero_()
        module.model.blocks[1].mlp.fc1.weight.zero_()
    assert module.reference.tolist() == dense_top1.tolist()
    assert module.validation_metrics() == {**first, "agreement": 1.0, "agreement_unlabelled": 1.0}
    module.set_masks({"blocks.0.mlp.fc1": fc1.weight == 0})
    trainer.validate(module, dataloaders=loader, verbose=False)
    assert module.reference.tolist() == dense_top1.tolist()  # kept: compared against, not replaced
    with torch.no_grad():
        agree = int((module(images).argmax(-1) == dense_top1).sum())
    assert module.validation_metrics()["agreement"] == agree / 9 < 1
    module.reset_reference()
    assert module.reference is None


# --------------------------------------------------------------------------- slow: DDP and the real model

DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import lightning as L
    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.data.images import ImageFolderDataModule
    from wanda_pl.modules.classifier import Classifier

    ckpt, root, devices, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    module = Classifier(checkpoint_path=ckpt, calibration_batch_size=4)
    dm = ImageFolderDataModule(root=root, nsamples=8, batch_size=2, unlabelled=root + "/extra")
    pruning = Pruning(method="wanda", sparsity_ratio=0.6)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[pruning, Calibration(propagate=False)])
    trainer.validate(module, datamodule=dm, verbose=False)
    dense = dict(module.validation_metrics())
    pruning.enabled = True
    trainer.validate(module, datamodule=dm, verbose=False)
    if trainer.is_global_zero:
        json.dump({"dense": dense, "pruned": module.validation_metrics(), "world": trainer.world_size}, open(out, "w"))
""")


@pytest.mark.slow
def test_one_and_two_devices_give_equal_metrics(image_root, tmp_path):
    _tiny_vit(num_classes=6, seed=2).save(tmp_path / "ckpt")
    script = tmp_path / "ddp_validate.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"metrics{devices}.json"
        argv = [str(script), str(tmp_path / "ckpt"), str(image_root), str(devices), str(out)]
        if devices == 1:  # in this process: a process start costs more than the tiny model's run
            import runpy

            saved, sys.argv = sys.argv, argv
            try:
                runpy.run_path(str(script), run_name="__main__")
            finally:
                sys.argv = saved
        else:
            proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    assert results[2]["world"] == 2
    for phase in ("dense", "pruned"):
        one, two = results[1][phase], results[2][phase]
        assert one["images"] == two["images"] == 10  # 10 images over 2 ranks: no padding, none lost
        assert one["labelled"] == two["labelled"] == 7
        for key in ("top1", "top5", "agreement", "agreement_unlabelled", "top1_correct"):
            assert one[key] == pytest.approx(two[key], abs=1e-6), (phase, key, one, two)
    assert 0.0 < results[1]["pruned"]["agreement"] < 1.0  # a non-trivial agreement was compared
