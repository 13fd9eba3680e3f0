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


@pytest.mark.parametrize("preset", ["quality", "balanced"])
def test_a_preset_prunes_exactly_as_its_settings_spelled_out(tiny_dirs, preset):
    """A preset is a name for settings: the masks and weights are those of the same settings given one
    by one, and the report's method section names the preset."""
    from wanda_pl.methods.presets import PRESETS

    calib = torch.randint(0, 256, (4, 16))
    results = []
    for kwargs in ({"preset": preset}, PRESETS[preset]):
        torch.manual_seed(0)
        module = CausalLM(str(tiny_dirs["llama"]))
        pruning = Pruning(sparsity_type="2:4", **kwargs)
        with pruning.run() as run:
            pruning.on_validation_start(_trainer(calib), module)
        results.append((run.result.masks, {k: v.clone() for k, v in module.model.state_dict().items()},
                        pruning.describe()))
    (masks, state, described), (masks2, state2, described2) = results
    assert masks.keys() == masks2.keys() and all(torch.equal(masks[k], masks2[k]) for k in masks)
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert described["preset"] == preset and "preset" not in described2
    assert {k: v for k, v in described.items() if k != "preset"} == described2
    assert described["method"] == PRESETS[preset]["method"]


def test_a_preset_refuses_a_setting_that_contradicts_it_and_a_sweep_point_that_would():
    pruning = Pruning(preset="quality", sparsity_type="2:4", reconstruct_steps=5)  # its own options: fine
    assert pruning.settings.reconstruct.mode == "block" and pruning.settings.reconstruct.steps == 5
    assert pruning.settings.replace(sparsity_type="4:8").args["method"] == "admm"  # a sweep over types keeps it
    with pytest.raises(ValueError, match=r"preset quality sets method='admm'.*'sparsegpt'"):
        pruning.settings.replace(method="sparsegpt")  # a sweep over methods contradicts it: said, not ignored
    with pytest.raises(ValueError, match="pruning.preset must be one of quality, balanced"):
        Pruning(preset="fast")
