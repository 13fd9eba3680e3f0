"""Mixture-of-Experts models: every expert's slice of the fused parameters is pruned on the tokens
the router sends to it, checked against a slow reference that routes by hand."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import MOE_FAMILIES as MOE
from conftest import run_cli, tiny_model
from wanda_pl.callbacks import Calibration, Pruning
from wanda_pl.modules.causal_lm import CausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def moe_dirs(tiny_dirs):
    return tiny_dirs


def _prune(module, calib, *args, **kwargs):
    calibration = Calibration()
    calibration.inputs = calib
    trainer = SimpleNamespace(callbacks=[calibration], is_global_zero=True, datamodule=None, global_rank=0,
                              world_size=1, sanity_checking=False)
    return Pruning(*args, **kwargs).prune(trainer, module)


def _mlp(block):
    return block.mlp if hasattr(block, "mlp") else block.block_sparse_moe


@pytest.mark.parametrize("family", MOE)
def test_default_targets_are_every_expert_slice_never_a_router_or_a_gate(moe_dirs, family):
    module = CausalLM(str(moe_dirs[family]))
    names = set(module.all_targets())
    experts = {n for n in names if ".experts." in n}
    assert experts == {f"model.layers.{b}.mlp.experts.{p}.{e}" for b in range(2) for e in range(4)
                       for p in ("gate_up_proj", "down_proj")}
    assert not any(n.endswith("mlp.gate") or "shared_expert_gate" in n for n in names)
    if family == "qwen2_moe":  # its shared expert is an ordinary MLP
        assert {f"model.layers.0.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= names


def _reference_block0_masks(model, calib, ratio=0.5):
    """Wanda on block 0's experts by hand: the MLP input captured on the dense model, routed by the
    router's top-k logits, each expert's inputs (and for down_proj its own act(gate) * up) summed."""
    block = model.model.layers[0]
    mlp = _mlp(block)
    seen = []
    handle = block.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        for window in calib:
            model(window.unsqueeze(0))
    handle.remove()
    experts, k = mlp.experts, model.config.num_experts_per_tok
    sums = {}
    for h in seen:
        h = h.reshape(-1, h.shape[-1])
        chosen = torch.topk(h @ mlp.gate.weight.t(), k, dim=-1).indices
        for e in range(experts.gate_up_proj.shape[0]):
            x = h[(chosen == e).any(-1)]
            gate, up = (x @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
            for param, inp in (("gate_up_proj", x), ("down_proj", F.silu(gate) * up)):
                sums[(param, e)] = sums.get((param, e), 0) + inp.pow(2).sum(0)
    masks = {}
    for (param, e), sq in sums.items():
        w = getattr(experts, param)[e].detach()
        score = w.abs() * torch.sqrt(sq / len(calib))
        order = torch.sort(score, dim=1, stable=True).indices[:, : int(w.shape[1] * ratio)]
        masks[f"model.layers.0.mlp.experts.{param}.{e}"] = torch.zeros_like(w, dtype=torch.bool).scatter_(1, order, True)
    return masks


@pytest.mark.parametrize("family", MOE)
def test_wanda_prunes_each_expert_on_its_routed_tokens(moe_dirs, family):
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 16))
    module = CausalLM(str(moe_dirs[family]))
    want = _reference_block0_masks(CausalLM(str(moe_dirs[family])).model, calib)
    router = _mlp(module.model.model.layers[0]).gate.weight.detach().clone()
    result = _prune(module, calib, "wanda", sparsity_ratio=0.5)
    for name, mask in want.items():
        assert torch.equal(result.masks[name], mask), name
    assert torch.equal(_mlp(module.model.model.layers[0]).gate.weight, router)  # routers are never pruned
    experts = _mlp(module.model.model.layers[1]).experts
    for p in ("gate_up_proj", "down_proj"):
        zeros = getattr(experts, p) == 0  # the fused parameter itself holds every expert's zeros
        assert (zeros.sum(-1) == getattr(experts, p).shape[-1] // 2).all(), p  # every row of every expert


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_n_m_holds_in_every_group_of_every_expert(moe_dirs, family):
    module = CausalLM(str(moe_dirs[family]))
    _prune(module, torch.randint(0, 256, (2, 16)), "sparsegpt", sparsity_type="2:4")
    for b in range(2):
        experts = _mlp(module.model.model.layers[b]).experts
        for p in ("gate_up_proj", "down_proj"):
            w = getattr(experts, p)
            groups = (w == 0).reshape(*w.shape[:-1], -1, 4).sum(-1)
            assert (groups == 2).all(), (b, p)


def test_the_saved_moe_reloads_at_the_reported_perplexity_and_sparsity(moe_dirs, text_file, tmp_path):
    from test_cli import base_args

    out = tmp_path / "out"
    error, _ = run_cli(base_args(moe_dirs["qwen2_moe"], text_file, out, "--pruning.method", "wanda",
                                 "--save_model", "true"))
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    assert report["actual_sparsity"] == 0.5 and report["target_coverage"] > 0.99  # routers and the gate only
    assert report["sparsity_block_weights"] == pytest.approx(0.5 * report["target_coverage"], abs=1e-6)
    routed = report["expert_tokens"]["model.layers.0.mlp.experts"]
    assert set(routed) == {"0", "1", "2", "3"} and sum(routed.values()) == 4 * 32 * 2  # windows x seqlen x top-2
    masks = torch.load(out / "masks.pt")
    assert "model.layers.1.mlp.experts.down_proj.3" in masks
    reloaded = CausalLM(str(out / "model"))  # stock from_pretrained of the fused layout
    experts = reloaded.model.model.layers[1].mlp.experts
    assert torch.equal(experts.down_proj[3] == 0, masks["model.layers.1.mlp.experts.down_proj.3"])
    error, stdout = run_cli(["validate", "--model.name_or_path", str(out / "model"), "--data.calibration",
                             str(text_file), "--data.evaluation", str(text_file), "--data.nsamples", "4",
                             "--data.seqlen", "32", "--data.max_eval_windows", "4",
                             "--trainer.enable_progress_bar", "false"])
    assert error is None, error
    assert f"{report['metrics']['ppl']['pruned']:.4f}"[:6] in stdout


def _never_routed(module, expert=3):
    """Every router of ``module`` picks the top-k among the other experts: ``expert`` gets no token."""
    def hook(router, args, out):
        logits = out[0].clone()
        logits[:, expert] = float("-inf")
        top, index = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
        return out[0], top / top.sum(-1, keepdim=True), index

    for layer in module.model.model.layers:
        _mlp(layer).gate.register_forward_hook(hook)
    return module


@pytest.mark.parametrize("action", ["magnitude", "dense", "error"])
def test_an_expert_calibration_never_reached_follows_the_policy(moe_dirs, action):
    module = _never_routed(CausalLM(str(moe_dirs["mixtral"])))
    experts = _mlp(module.model.model.layers[0]).experts
    unused = experts.gate_up_proj[3].detach().clone()
    calib = torch.randint(0, 256, (2, 16))
    if action == "error":
        with pytest.raises(ValueError, match=r"gate_up_proj.3: expert 3 received 0 calibration tokens"):
            _prune(module, calib, "sparsegpt", rare_experts=action, min_expert_tokens=1)
        return
    # SparseGPT on no tokens must not fail; one token is enough to count here
    result = _prune(module, calib, "sparsegpt", rare_experts=action, min_expert_tokens=1)
    name = "model.layers.0.mlp.experts.gate_up_proj.3"
    assert result.rare[name] == {"tokens": 0, "took": action} and result.tokens[name] == 0
    assert set(result.rare) == {f"model.layers.{b}.mlp.experts.{p}.3" for b in (0, 1)
                                for p in ("gate_up_proj", "down_proj")}
    if action == "dense":
        assert torch.equal(experts.gate_up_proj[3], unused) and not result.masks[name].any()
    else:  # magnitude, one threshold over the whole matrix: its smallest half of |W|
        k = unused.numel() // 2
        want = torch.zeros(unused.numel(), dtype=torch.bool)
        want[torch.sort(unused.abs().flatten(), stable=True).indices[:k]] = True
        assert torch.equal(result.masks[name].flatten(), want)


def test_rare_expert_settings_are_checked_before_any_work():
    with pytest.raises(ValueError, match="pruning.rare_experts must be one of"):
        Pruning(rare_experts="skip")
    with pytest.raises(ValueError, match="pruning.min_expert_tokens must be an integer >= 0"):
        Pruning(min_expert_tokens=-1)
    assert "rare_experts" not in Pruning().describe()  # defaults leave earlier sweep fingerprints as they were
    assert Pruning(rare_experts="dense").describe()["rare_experts"] == "dense"


def test_by_default_a_hessian_method_needs_as_many_tokens_as_inputs(moe_dirs):
    module = CausalLM(str(moe_dirs["mixtral"]))
    targets = module.all_targets()
    result = _prune(module, torch.randint(0, 256, (2, 16)), "sparsegpt")
    experts = {n: t for n, t in result.tokens.items() if ".experts." in n}
    assert experts and set(result.rare) == {n for n, t in experts.items() if t < targets[n].weight.shape[1]}
    assert all(v["took"] == "magnitude" for v in result.rare.values())
    assert not _prune(CausalLM(str(moe_dirs["mixtral"])), torch.randint(0, 256, (2, 16)), "wanda").rare  # one token


def test_full_fine_tuning_keeps_every_expert_mask(moe_dirs, text_file, tmp_path):
    """``fit`` masks the fused parameters' gradients and steps as their slices' masks say: after training
    every pruned expert weight is still exactly zero and the kept ones moved."""
    from test_finetune import common
    from wanda_pl.core.layers import weight_of

    out = tmp_path / "fit"
    error, _ = run_cli(["fit", "--model.name_or_path", str(moe_dirs["mixtral"]), "--model.learning_rate", "0.01",
                        "--pruning.enabled", "true", "--trainer.max_steps", "3", *common(text_file, out)])
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity_before"] == report["sparsity_after"] == 0.5
    masks = torch.load(out / "masks.pt", weights_only=True)
    trained = CausalLM(str(out / "model")).model
    dense = CausalLM(str(moe_dirs["mixtral"])).model
    name = "model.layers.1.mlp.experts.down_proj.2"
    assert name in masks
    for n, mask in masks.items():
        w = weight_of(trained, n)
        assert torch.equal(w == 0, mask), n
    moved = weight_of(trained, name)[~masks[name]] - weight_of(dense, name)[~masks[name]]
    assert moved.abs().max() > 0  # the kept expert weights were trained


@pytest.mark.slow
def test_data_parallel_calibration_sums_each_expert_s_tokens(moe_dirs, text_file, tmp_path):
    """Two ranks route their own share of the samples; each expert's statistics and token count are
    summed over the ranks: the same counts and (up to float order) the same masks as one process."""
    from test_ddp import agreement, run

    one = run(moe_dirs["qwen2_moe"], text_file, tmp_path / "one")
    two = run(moe_dirs["qwen2_moe"], text_file, tmp_path / "two", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert two["calibration_samples_per_rank"] == [3, 2]
    first = "model.layers.0.mlp.experts"  # what enters block 0 does not depend on any pruning
    assert one["expert_tokens"][first] == two["expert_tokens"][first] and sum(one["expert_tokens"][first].values()) > 0
    m1, m2 = (torch.load(tmp_path / d / "masks.pt", weights_only=True) for d in ("one", "two"))
    assert list(m1) == list(m2) and agreement(m1, m2) >= 0.9999


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["none", "disk"])
def test_a_killed_moe_run_resumes_bit_identical(moe_dirs, text_file, tmp_path, offload):
    """offload disk: the experts are read fused from the per-expert checkpoint tensors, written back
    per expert (the family's layout), read again from the written shard on resume; all equal to the
    uninterrupted resident run."""
    import signal

    from test_resume import assert_same_output, in_process, run, weights

    args = ("--pruning.method", "sparsegpt")
    # only the kill needs a process of its own (tests/test_resume.py)
    assert in_process(moe_dirs["mixtral"], text_file, tmp_path / "whole", *args)[0] is None
    out = tmp_path / "runs" / "out"
    killed = run(moe_dirs["mixtral"], text_file, out, *args, "--model.offload", offload, kill_after=0, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    error, _ = in_process(moe_dirs["mixtral"], text_file, out, *args, "--model.offload", offload, "--resume", "true")
    assert error is None, error
    assert_same_output(tmp_path / "whole", out)
    assert set(weights(out / "model")) == set(weights(moe_dirs["mixtral"]))  # block_sparse_moe.experts.E.w1 ...
    whole, resumed = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "whole", out))
    assert resumed["resumed_from_block"] == 1
    assert resumed["expert_tokens"] == whole["expert_tokens"]  # block 0's counts came back from its checkpoint
    assert resumed["rare_expert_layers"] == whole["rare_expert_layers"]


@pytest.mark.slow
def test_the_upcycled_smollm2_moe_computes_smollm2_and_prunes_every_expert(tmp_path):
    """The embedded real-weights MoE (SmolLM2's MLP in 8 experts, a random top-2 router): its dense
    perplexity is SmolLM2's; magnitude at 50% reaches 50% of the block weights, not of the attention."""
    common = ["--data.calibration", "wikipedia", "--data.evaluation", "wikipedia", "--data.nsamples", "2",
              "--data.seqlen", "128", "--data.max_eval_windows", "2", "--trainer.enable_progress_bar", "false"]
    ppl = {}
    for name in ("smollm2-135m", "smollm2-moe-8x135m"):
        out = tmp_path / name
        error, _ = run_cli(["prune", "--model.name_or_path", name, "--pruning.method", "magnitude",
                            "--output_dir", str(out), *common])
        assert error is None, error
        report = json.loads((out / "report.json").read_text())
        ppl[name] = report["metrics"]["ppl"]["dense"]
    assert ppl["smollm2-moe-8x135m"] == pytest.approx(ppl["smollm2-135m"], rel=1e-4)
    assert report["target_coverage"] > 0.999 and report["sparsity_block_weights"] == pytest.approx(0.5, abs=1e-3)
    assert len(report["layers"]) == 30 * (4 + 2 * 8)  # q k v o + 8 experts x (gate_up, down) per block


def _reap_reference(model, calib, ratio):
    """REAP by hand on block 0: mean over routed tokens of routing weight x ||expert output||, the lowest
    ``ratio`` of the experts removed (routing read from the router's own top-k)."""
    mlp = _mlp(model.model.layers[0])
    seen = []
    handle = mlp.gate.register_forward_hook(lambda m, a, o: seen.append((a[0].reshape(-1, a[0].shape[-1]), o)))
    with torch.no_grad():
        for window in calib:
            model(window.unsqueeze(0))
    handle.remove()
    e = mlp.experts
    n = e.gate_up_proj.shape[0]
    total, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n)
    for h, (_, weights, index) in seen:
        for t in range(h.shape[0]):
            for slot in range(index.shape[1]):
                j = int(index[t, slot])
                gate, up = (h[t] @ e.gate_up_proj[j].t()).chunk(2)
                out = (F.silu(gate) * up) @ e.down_proj[j].t()
                total[j] += float(weights[t, slot]) * float(out.double().norm())
                count[j] += 1
    score = total / count.clamp_min(1)
    return sorted(torch.sort(score, stable=True).indices[: int(ratio * n)].tolist())


def test_reap_removes_the_least_salient_experts_and_saves_a_smaller_model(moe_dirs, text_file, tmp_path):
    from test_cli import base_args
    from wanda_pl.training.masks import load_masks

    calib_ids = None
    out = tmp_path / "out"
    error, _ = run_cli(base_args(moe_dirs["mixtral"], text_file, out, "--pruning.method", "wanda",
                                 "--pruning.experts_ratio", "0.5", "--save_model", "true"))
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    calib_ids = torch.load(out / "calibration_ids.pt")
    dense = CausalLM(str(moe_dirs["mixtral"])).model
    removed = report["experts_pruned"]["model.layers.0.mlp.experts"]["removed"]
    assert removed == _reap_reference(dense, calib_ids, 0.5) and len(removed) == 2
    assert report["experts_ratio"] == 0.5 and report["actual_sparsity"] == 0.5
    smaller = CausalLM(str(out / "model")).model  # stock from_pretrained: the config says 2 experts
    assert smaller.config.num_local_experts == 2
    kept = [j for j in range(4) if j not in removed]
    experts = _mlp(smaller.model.layers[0]).experts
    assert experts.gate_up_proj.shape[0] == 2 and _mlp(smaller.model.layers[0]).gate.weight.shape[0] == 2
    assert torch.equal(_mlp(smaller.model.layers[0]).gate.weight, _mlp(dense.model.layers[0]).gate.weight[kept])
    masks = load_masks(out)
    for j, old in enumerate(kept):  # the kept experts' weights, then Wanda on what is left
        w = experts.gate_up_proj[j]
        assert torch.equal(w == 0, masks[f"model.layers.0.mlp.experts.gate_up_proj.{j}"])
        assert torch.equal(w[w != 0], _mlp(dense.model.layers[0]).experts.gate_up_proj[old][w != 0])
    assert report["parameters"] == sum(p.numel() for p in smaller.parameters())


def test_expert_ratio_refusals_before_any_work(moe_dirs, tiny_dirs, text_file, tmp_path):
    from test_cli import base_args

    error, _ = run_cli(base_args(moe_dirs["mixtral"], text_file, tmp_path / "a", "--pruning.experts_ratio", "0.75"))
    assert "removes 3 of 4 experts, leaving fewer than the 2" in error and not (tmp_path / "a").exists()
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, tmp_path / "b", "--pruning.experts_ratio", "0.5"))
    assert "has no fused experts" in error and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match=r"experts_ratio must be in \[0, 1\)"):
        Pruning(experts_ratio=1.0)
    error, _ = run_cli(base_args(moe_dirs["mixtral"], text_file, tmp_path / "d", "--pruning.experts_ratio", "0.5",
                                 "--model.offload", "disk"))
    assert "use model.offload cpu" in error and not (tmp_path / "d").exists()


def test_reap_saliency_weighs_each_expert_output_by_its_routing_weight():
    from wanda_pl.core.expert_pruning import saliency

    experts = _mlp(tiny_model("mixtral").model.layers[0]).experts
    with torch.no_grad():
        experts.gate_up_proj[1] = experts.gate_up_proj[0]
        experts.down_proj[1] = experts.down_proj[0]  # experts 0 and 1 compute the same
    hidden = torch.randn(5, 64)
    index = torch.tensor([[0, 1]] * 5)
    weights = torch.tensor([[0.9, 0.1]] * 5)
    sums, counts = saliency(experts, hidden, index, weights)
    assert counts.tolist() == [5, 5, 0, 0] and sums[2] == sums[3] == 0
    assert float(sums[0] / sums[1]) == pytest.approx(9.0, rel=1e-6)
    gate, up = (hidden @ experts.gate_up_proj[0].t()).chunk(2, dim=-1)
    norms = ((F.silu(gate) * up) @ experts.down_proj[0].t()).double().norm(dim=-1)
    assert float(sums[0]) == pytest.approx(float(0.9 * norms.sum()), rel=1e-6)


def test_a_sweep_removes_experts_at_every_point_from_the_dense_model(moe_dirs, text_file, tmp_path):
    """Each point starts from a fresh dense copy (the one before removed experts): the second point
    equals its own prune run."""
    from test_cli import base_args

    sweep = base_args(moe_dirs["mixtral"], text_file, tmp_path / "sweep", "--pruning.experts_ratio", "0.5",
                      "--sweep.ratios", "[0.3,0.5]")
    error, _ = run_cli(["sweep", *sweep[1:]])
    assert error is None, error
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    error, _ = run_cli(base_args(moe_dirs["mixtral"], text_file, tmp_path / "alone", "--pruning.experts_ratio", "0.5",
                                 "--pruning.sparsity_ratio", "0.5"))
    assert error is None, error
    alone = json.loads((tmp_path / "alone" / "report.json").read_text())
    second = json.loads((tmp_path / "sweep" / rows[1]["point"] / "report.json").read_text())
    assert second["experts_pruned"] == alone["experts_pruned"] and second["parameters"] == alone["parameters"]
    assert second["metrics"]["ppl"]["pruned"] == pytest.approx(alone["metrics"]["ppl"]["pruned"], rel=1e-5)
