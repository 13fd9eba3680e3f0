"""Adding a method, or a step after one, is one file plus one line in its table: a tiny method with an
option of its own and a tiny refinement step, defined here (as their files would be) and entered in the
tables, run through the Pruning callback, the engine and the command line unchanged."""
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from wanda_pl import methods
from wanda_pl.callbacks import Pruning
from wanda_pl.callbacks import pruning as pruning_module
from wanda_pl.core.method import Method, option
from wanda_pl.core.sparsity import SparsitySpec, select_mask
from wanda_pl.methods.base import MaskOptions, Step


# --- what would be wanda_pl/methods/column_norm.py ---------------------------------------------
@dataclass(frozen=True)
class ColumnNormOptions(MaskOptions):
    power: float = option(1.0, "the exponent of the input norm in column_norm's score.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.power > 0:
            raise ValueError(f"pruning.power must be > 0, got {self.power!r}")


def column_norm(weight, stats, spec, options: ColumnNormOptions):
    """Score ``|W| * (E||x_j||^2)^(power / 2)``: Wanda with a tunable exponent."""
    score = weight.abs() * stats.scaler_row.to(weight.device).pow(options.power / 2).unsqueeze(0)
    return select_mask(score, spec, options.granularity or "row"), None


METHOD = Method("column_norm", column_norm, ColumnNormOptions)


# --- what would be wanda_pl/methods/swap_first.py: a refinement step -----------------------------
@dataclass(frozen=True)
class SwapFirstOptions:
    swap_rows: int = option(0, "how many rows (from the top) swap their first pruned and first kept weight.")


def swap_first(weight, new, stats, spec, mask, options):
    """Per row among the first ``swap_rows``: the first pruned weight comes back, the first kept one goes."""
    mask = mask.clone()
    for i in range(min(options.swap_rows, mask.shape[0])):
        pruned, kept = int(mask[i].nonzero()[0]), int((~mask[i]).nonzero()[0])
        mask[i, pruned], mask[i, kept] = False, True
    return mask, new


STEP = Step("swap_first", "refine", SwapFirstOptions, swap_first)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def in_the_table(monkeypatch):
    monkeypatch.setitem(methods.METHODS, METHOD.name, METHOD)  # the one line in methods/__init__.py
    monkeypatch.setitem(methods.STEPS, STEP.name, STEP)  # and its one line in the steps' table
    pruning_module.refresh()  # in the package, the tables are whole before the callback reads them
    yield
    monkeypatch.undo()
    pruning_module.refresh()


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
    assert pruning.settings.options == ColumnNormOptions() and pruning.describe()["method"] == "column_norm"
    assert pruning.describe()["method_options"] == {"granularity": None, "power": 1.0}  # in every report
    result = pruning.prune(trainer, module)
    assert set(result.masks) == set(targets) and all(s == SparsitySpec(0.5) for s in result.plan.values())
    for name, m in targets.items():
        mask = result.masks[name]
        assert int(mask.sum(1).min()) == int(mask.sum(1).max()) == mask.shape[1] // 2  # per row, exactly half
        assert bool((m.weight[mask] == 0).all()) and torch.equal(m.weight[~mask], dense[name][~mask])
    # the first layer sees the embeddings directly: its score is checkable by hand on all 4 windows
    x = torch.cat([module.model.get_input_embeddings()(calib[i:i + 1]).reshape(-1, 64) for i in range(4)])
    assert first == "model.layers.0.self_attn.q_proj"
    x = module.model.model.layers[0].input_layernorm(x)
    score = dense[first].abs() * (x.pow(2).sum(0) / 4).sqrt().unsqueeze(0)
    assert torch.equal(result.masks[first], select_mask(score, SparsitySpec(0.5), "row"))


def test_its_options_are_its_own(in_the_table):
    assert METHOD.option_names == ("granularity", "power")
    assert "power" in methods.options() and "swap_rows" in methods.options()
    assert METHOD.make_options(power=2.0, blocksize=16, use_variant=False) == ColumnNormOptions(power=2.0)
    with pytest.raises(ValueError, match="granularity"):
        METHOD.make_options(granularity="column")
    with pytest.raises(ValueError, match="use_variant"):
        Pruning("column_norm", use_variant=True)  # the variant is Wanda's knob, not this method's
    with pytest.raises(ValueError, match="pruning.power must be > 0"):
        Pruning("wanda", power=0.0)  # checked by its owner even when another method runs: a typo must not wait


def test_the_command_line_offers_the_new_method_its_option_and_the_step(in_the_table, tiny_dirs, text_file, tmp_path):
    """``--pruning.power`` and ``--pruning.refine swap_first`` exist with no edit outside the two files; the
    step moves exactly one weight per swapped row, the count kept; the report records both."""
    from test_cli import base_args

    error, shown = run_cli(["prune", "--help"])
    assert error is None, error
    assert "--pruning.power" in shown and "column_norm" in shown and "swap_first" in shown
    assert "exponent of the input norm" in shown  # the option's own help text
    runs = {}
    for name, extra in (("plain", []), ("swapped", ["--pruning.refine", "swap_first", "--pruning.swap_rows", "3"])):
        out = tmp_path / name
        error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out, "--pruning.method", "column_norm",
                                     "--pruning.power", "2.0", "--save_model", "true", *extra))
        assert error is None, error
        runs[name] = (json.loads((out / "report.json").read_text()), torch.load(out / "masks.pt"))
    report, masks = runs["swapped"]
    assert report["method"] == "column_norm" and report["refine"] == "swap_first"
    assert report["method_options"] == {"granularity": None, "power": 2.0, "swap_rows": 3}
    assert runs["plain"][0]["method_options"] == {"granularity": None, "power": 2.0}
    first_block = {n: m for n, m in runs["plain"][1].items() if n.startswith("model.layers.0.")}
    assert len(first_block) == 7  # the same statistics in both runs: later blocks see other inputs
    for name, plain in first_block.items():
        changed = (plain != masks[name]).sum(1)
        assert changed[:3].tolist() == [2, 2, 2] and int(changed[3:].sum()) == 0, name
        assert torch.equal(plain.sum(1), masks[name].sum(1)), name  # a refinement keeps every row's count


def test_an_option_declared_twice_must_agree(monkeypatch):
    @dataclass(frozen=True)
    class Clash:
        blocksize: int = option(64, "another default for SparseGPT's option")

    monkeypatch.setitem(methods.METHODS, "clash", Method("clash", column_norm, Clash))
    with pytest.raises(TypeError, match="blocksize"):
        methods.options()
