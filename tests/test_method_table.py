"""Adding a method is one file plus one entry in the table: a tiny method defined here (as its own
file would), entered in the table, runs through the Pruning callback and the engine unchanged."""
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from wanda_pl import methods
from wanda_pl.callbacks import Pruning
from wanda_pl.core.sparsity import SparsitySpec, select_mask
from wanda_pl.methods.base import MaskOptions, Method


# --- what would be wanda_pl/methods/column_norm.py ---------------------------------------------
@dataclass(frozen=True)
class ColumnNormOptions(MaskOptions):
    power: float = 1.0  # a knob of its own


def column_norm(weight, stats, spec, options: ColumnNormOptions):
    """Score ``|W| * (E||x_j||^2)^(power / 2)``: Wanda with a tunable exponent."""
    score = weight.abs() * stats.scaler_row.to(weight.device).pow(options.power / 2).unsqueeze(0)
    return select_mask(score, spec, options.granularity or "row"), None


METHOD = Method("column_norm", column_norm, ColumnNormOptions)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def in_the_table(monkeypatch):
    monkeypatch.setitem(methods.METHODS, METHOD.name, METHOD)  # the one line in methods/__init__.py


def test_a_new_method_runs_through_the_callback_and_the_engine(in_the_table, tiny_dirs):
    from wanda_pl.callbacks import Calibration
    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM(str(tiny_dirs["llama"]))
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 16))
    targets = module.all_targets()
    dense = {n: m.weight.detach().clone() for n, m in targets.items()}
    first = next(iter(targets))
    calibration = Calibration()
    calibration.inputs = calib
    trainer = SimpleNamespace(callbacks=[calibration], is_global_zero=True, datamodule=None, global_rank=0, world_size=1)
    pruning = Pruning("column_norm", sparsity_ratio=0.5)
    assert pruning.options == ColumnNormOptions() and pruning.describe()["method"] == "column_norm"
    assert pruning.describe()["method_options"] == {"granularity": None, "power": 1.0}  # in every report
    outcome = pruning.prune(trainer, module)
    assert set(outcome.masks) == set(targets) and all(s == SparsitySpec(0.5) for s in outcome.plan.values())
    for name, m in targets.items():
        mask = outcome.masks[name]
        assert int(mask.sum(1).min()) == int(mask.sum(1).max()) == mask.shape[1] // 2  # per row, exactly half
        assert bool((m.weight[mask] == 0).all()) and torch.equal(m.weight[~mask], dense[name][~mask])
    # the first layer sees the embeddings directly: its score is checkable by hand on all 4 windows
    x = torch.cat([module.model.get_input_embeddings()(calib[i:i + 1]).reshape(-1, 64) for i in range(4)])
    assert first == "model.layers.0.self_attn.q_proj"
    x = module.model.model.layers[0].input_layernorm(x)
    score = dense[first].abs() * (x.pow(2).sum(0) / 4).sqrt().unsqueeze(0)
    assert torch.equal(outcome.masks[first], select_mask(score, SparsitySpec(0.5), "row"))


def test_its_options_are_its_own(in_the_table):
    assert METHOD.option_names == ("granularity", "power")
    assert METHOD.make_options(power=2.0, blocksize=16, use_variant=False) == ColumnNormOptions(power=2.0)
    with pytest.raises(ValueError, match="granularity"):
        METHOD.make_options(granularity="column")
    with pytest.raises(ValueError, match="use_variant"):
        Pruning("column_norm", use_variant=True)  # the variant is Wanda's knob, not this method's
