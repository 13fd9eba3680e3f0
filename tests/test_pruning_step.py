"""Pruning as an explicit step: a command asks the Pruning callback for one pruning with its settings
and reads the result, instead of setting the callback's fields and reading them back."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from wanda_pl.callbacks import Calibration, Pruning
from wanda_pl.modules.causal_lm import CausalLM


def _trainer(calib):
    calibration = Calibration()
    calibration.inputs = calib
    return SimpleNamespace(callbacks=[calibration], is_global_zero=True, datamodule=None, global_rank=0,
                           world_size=1, sanity_checking=False)


def test_a_run_prunes_with_its_own_settings_and_leaves_the_callback_as_it_was(tiny_dirs):
    module = CausalLM(str(tiny_dirs["llama"]))
    trainer = _trainer(torch.randint(0, 256, (4, 16)))
    pruning = Pruning("wanda", sparsity_ratio=0.5)
    point = pruning.settings.replace(method="magnitude", sparsity_ratio=0.25)  # what a sweep point does
    with pruning.run(point) as run:
        assert run.result is None
        pruning.on_validation_start(trainer, module)  # what the validation inside does
        pruning.on_validation_start(trainer, module)  # a second validation inside prunes nothing more
    masks = run.result.masks
    assert masks and all(int(m.sum()) == int(m.numel() * 0.25) for m in masks.values())  # magnitude, per layer
    assert {s.ratio for s in run.result.plan.values()} == {0.25}
    assert pruning.masks == {} and pruning.result is None  # the callback's own state is untouched
    assert pruning.settings.method.name == "wanda" and pruning.settings.spec.ratio == 0.5
    for name, mask in masks.items():
        assert bool((module.model.get_submodule(name).weight[mask] == 0).all())


def test_a_run_that_no_validation_reached_says_so(tiny_dirs):
    pruning = Pruning("magnitude")
    with pytest.raises(RuntimeError, match="nothing was pruned"):
        with pruning.run():
            pass


def test_untouched_measures_the_model_as_it_is_whatever_enabled_says(tiny_dirs):
    module = CausalLM(str(tiny_dirs["llama"]))
    dense = {n: m.weight.detach().clone() for n, m in module.all_targets().items()}
    pruning = Pruning("magnitude", enabled=True)
    trainer = _trainer(torch.randint(0, 256, (2, 16)))
    with pruning.untouched():
        pruning.on_validation_start(trainer, module)
    assert pruning.masks == {}
    assert all(torch.equal(m.weight, dense[n]) for n, m in module.all_targets().items())
    pruning.on_validation_start(trainer, module)  # outside: enabled prunes, as `validate` does
    assert pruning.masks and pruning.masks_source == "pruned"


def test_the_prune_command_measures_a_dense_baseline_even_with_enabled_true(tiny_dirs, text_file, tmp_path):
    from test_cli import base_args

    reports = {}
    for name, extra in (("plain", []), ("enabled", ["--pruning.enabled", "true"])):
        error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, tmp_path / name, "--pruning.method", "magnitude",
                                     *extra))
        assert error is None, error
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["enabled"]["metrics"] == reports["plain"]["metrics"]
    assert reports["enabled"]["actual_sparsity"] == reports["plain"]["actual_sparsity"] == 0.5
