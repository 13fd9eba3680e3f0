"""The block-sequential engine against a slow, obviously-correct implementation.

The slow version prunes block i after running the FULL model (``model(input_ids)``) on every
calibration sample with forward hooks only on block i's Linear/Conv1D layers; because earlier
blocks are already pruned, later blocks see pruned activations, which is what the engine's
``propagate=True`` does with one block at a time. Masks must be exactly equal."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from wanda_pl.families.hf_causal import find_blocks
from wanda_pl.core.layers import select_targets
from wanda_pl.callbacks import Calibration, Pruning
from wanda_pl.core.engine import prune_sequential
from wanda_pl.core.hooks import capture_inputs
from wanda_pl.methods import get_method
from wanda_pl.modules.causal_lm import CausalLM
from wanda_pl.core.sparsity import SparsitySpec

NSAMPLES, SEQLEN = 4, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the slow reference
def is_linear(m):
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def out_in(m):
    """(out, in) weight; HF's Conv1D stores (in, out)."""
    return m.weight.t() if type(m).__name__ == "Conv1D" else m.weight


def to_param_shape(m, mask):
    return mask.t() if type(m).__name__ == "Conv1D" else mask


def slow_row_mask(score, ratio):
    k = int(score.shape[1] * ratio)
    idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def slow_nm_mask(score, n, m):
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        vals = score[i].tolist()
        for g in range(0, cols, m):
            for j in sorted(range(g, g + m), key=lambda j: (vals[j], j))[:n]:
                mask[i, j] = True
    return mask


def slow_mask(score, spec):
    return slow_nm_mask(score, spec.n, spec.m) if spec.structured else slow_row_mask(score, spec.ratio)


def block_list(model):
    prefix, _ = find_blocks(model)
    return prefix, model.get_submodule(prefix)


def full_forward_sq_sums(model, calib, layers):
    """sum over samples and tokens of x_j^2 for each layer, from full-model forwards, one sample at a time."""
    sq = {name: torch.zeros(out_in(m).shape[1]) for name, m in layers.items()}
    handles = []
    for name, m in layers.items():
        def hook(mod, args, out, name=name):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            sq[name] += (x * x).sum(dim=0)
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for s in range(calib.shape[0]):
                model(calib[s : s + 1])
    finally:
        for h in handles:
            h.remove()
    return sq


def slow_wanda(model, calib, spec, propagate=True):
    """Masks (shaped like each weight) of the Wanda method, computed block by block with full forwards."""
    prefix, blocks = block_list(model)
    masks = {}
    dense_sq = None
    if not propagate:  # every statistic from the dense model
        all_layers = {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in b.named_modules() if is_linear(m)}
        dense_sq = full_forward_sq_sums(model, calib, all_layers)
    for i, block in enumerate(blocks):
        layers = {f"{prefix}.{i}.{n}": m for n, m in block.named_modules() if is_linear(m)}
        sq = dense_sq if dense_sq is not None else full_forward_sq_sums(model, calib, layers)
        for name, m in layers.items():
            W = out_in(m)
            score = W.detach().abs() * torch.sqrt(sq[name] / calib.shape[0])
            mask = slow_mask(score, spec)
            with torch.no_grad():
                W[mask] = 0  # W is a view of m.weight (also for Conv1D)
            masks[name] = to_param_shape(m, mask)
    return masks


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(1234))


def load_reference_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def engine_prune(module, calib, method="wanda", spec=SparsitySpec(0.5), propagate=True, options=None):
    blocks, inputs = module.prunable_blocks(calib if get_method(method).needs_activations else None)
    return prune_sequential(blocks, inputs, module.block_targets, get_method(method), spec, options,
                            propagate=propagate, progress=False)


def assert_same_masks(got, expected):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        diff = int((got[name] != expected[name]).sum())
        assert diff == 0, f"{name}: {diff} mask entries differ"


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- engine == slow
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_engine_matches_slow_full_forward(tiny_dirs, calib, family, sparsity_type):
    spec = SparsitySpec.parse(sparsity_type, 0.5)
    module = CausalLM(str(tiny_dirs[family]))
    result = engine_prune(module, calib, spec=spec)

    ref = load_reference_model(tiny_dirs[family])
    expected = slow_wanda(ref, calib, spec)
    assert len(expected) == 14 if family == "llama" else len(expected) > 0
    assert_same_masks(result.masks, expected)
    # the engine edited the weights in place exactly like the slow version (and nothing else)
    assert_same_weights(module.model, ref)
    for name, mask in result.masks.items():
        w = module.model.get_submodule(name).weight
        assert mask.shape == w.shape and bool((w[mask] == 0).all())
        assert abs(mask.float().mean().item() - 0.5) < 1e-9
    # each later block saw pruned activations: its masks differ from the dense-statistics ones
    prefix, _ = find_blocks(ref)
    dense = slow_wanda(load_reference_model(tiny_dirs[family]), calib, spec, propagate=False)
    block0 = [n for n in expected if n.startswith(f"{prefix}.0.")]
    block1 = [n for n in expected if n.startswith(f"{prefix}.1.")]
    assert block0 and block1
    assert all(torch.equal(expected[n], dense[n]) for n in block0)
    assert any(not torch.equal(expected[n], dense[n]) for n in block1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_propagate_false_equals_dense_statistics(tiny_dirs, calib, family):
    spec = SparsitySpec(0.5)
    module = CausalLM(str(tiny_dirs[family]))
    result = engine_prune(module, calib, spec=spec, propagate=False)
    expected = slow_wanda(load_reference_model(tiny_dirs[family]), calib, spec, propagate=False)
    assert_same_masks(result.masks, expected)
    # and it is really a different setting from propagate=True
    propagated = slow_wanda(load_reference_model(tiny_dirs[family]), calib, spec, propagate=True)
    assert any(not torch.equal(expected[n], propagated[n]) for n in expected)


def test_callback_path_matches_slow(tiny_dirs, text_file):
    """Through Lightning: Trainer.validate with the Pruning + Calibration callbacks and the text datamodule."""
    import lightning as L

    from wanda_pl.data.text_module import TextDataModule

    module = CausalLM(str(tiny_dirs["llama"]))
    dm = TextDataModule(str(text_file), str(text_file), nsamples=NSAMPLES, seqlen=SEQLEN, seed=3, max_eval_windows=2)
    pruning = Pruning("wanda", sparsity_type="2:4", enabled=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[pruning, Calibration(store_device="cpu", propagate=True)])
    trainer.validate(module, datamodule=dm, verbose=False)
    calib_ids = dm.calibration_ids()
    assert calib_ids.shape == (NSAMPLES, SEQLEN)
    expected = slow_wanda(load_reference_model(tiny_dirs["llama"]), calib_ids, SparsitySpec.parse("2:4"))
    assert_same_masks(pruning.masks, expected)
    ppl = module.validation_metrics()["ppl"]
    assert ppl is not None and ppl == ppl


# --------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_magnitude_runs_no_forward_pass(tiny_dirs, family):
    module = CausalLM(str(tiny_dirs[family]))
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
               for name, m in module.model.named_modules()]
    # no datamodule at all: asking for calibration data would fail
    trainer = SimpleNamespace(callbacks=[], is_global_zero=True, datamodule=None, global_rank=0, world_size=1)
    pruning = Pruning("magnitude", sparsity_ratio=0.5)
    pruning.prune(trainer, module)
    for h in handles:
        h.remove()
    assert calls == []
    assert pruning.result.forward_s == 0
    # one threshold per layer over |W|, ties by index
    ref = load_reference_model(tiny_dirs[family])
    for name, m in ref.named_modules():
        if name in pruning.masks:
            W = out_in(m).detach()
            k = int(W.numel() * 0.5)
            flat = torch.zeros(W.numel(), dtype=torch.bool)
            flat[torch.sort(W.abs().flatten(), stable=True).indices[:k]] = True
            assert torch.equal(pruning.masks[name], to_param_shape(m, flat.reshape(W.shape))), name
    assert len(pruning.masks) == sum(1 for n, m in ref.named_modules() if is_linear(m) and n != "lm_head")


# --------------------------------------------------------------------------- capture
def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "opt", "mixtral", "deepseek_v3"])
def test_capture_keeps_every_block_argument(tiny_dirs, calib, family):
    module = CausalLM(str(tiny_dirs[family]))
    _, blocks = find_blocks(module.model)
    seen = []

    def spy(_m, args, kwargs):
        seen.append((args, dict(kwargs)))

    h = blocks[0].register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        for s in range(NSAMPLES):
            module.model(input_ids=calib[s : s + 1], use_cache=False)
    h.remove()
    _, inputs = module.prunable_blocks(calib)
    assert len(inputs) == NSAMPLES
    for inp, (args, kwargs) in zip(inputs, seen):
        assert inp.key is None
        assert torch.equal(inp.hidden, args[0])
        assert _same(inp.args, tuple(args[1:]))
        assert inp.kwargs.keys() == kwargs.keys()
        assert _same(inp.kwargs, kwargs)
        # stored on the CPU
        for t in _tensors((inp.hidden, inp.args, inp.kwargs)):
            assert t.device.type == "cpu"
    if family in ("llama", "mistral", "qwen2"):
        pe = inputs[0].kwargs["position_embeddings"]
        assert isinstance(pe, tuple) and len(pe) == 2
        rot = module.model.model.rotary_emb
        pos = torch.arange(SEQLEN).unsqueeze(0)
        cos, sin = rot(inputs[0].hidden, pos)
        assert torch.equal(pe[0], cos) and torch.equal(pe[1], sin)
        assert torch.equal(inputs[0].kwargs["position_ids"], pos)
    # re-running block 0 from the captured inputs gives exactly the model's block-0 output
    outs = []
    h = blocks[0].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        module.model(input_ids=calib[:1], use_cache=False)
        replay = inputs[0].call(blocks[0], "cpu")
    h.remove()
    assert torch.equal(replay, outs[0])


def test_activations_stay_on_store_device(tiny_dirs, calib):
    module = CausalLM(str(tiny_dirs["llama"]))
    _, blocks = find_blocks(module.model)
    # every tensor the first block gets, hidden state and keyword arguments alike, goes to the store device
    inputs = capture_inputs(module.model, blocks[0], calib.split(1),
                            lambda m, ids: m(input_ids=ids, use_cache=False), store_device="meta")
    tensors = [t for inp in inputs for t in _tensors((inp.hidden, inp.args, inp.kwargs))]
    assert len(tensors) >= 4 * NSAMPLES
    assert all(t.device.type == "meta" for t in tensors)
    # the engine keeps block outputs on the store device between blocks
    named, inputs = module.prunable_blocks(calib, "cpu")
    prune_sequential(named, inputs, module.block_targets, get_method("wanda"), SparsitySpec(0.5), progress=False)
    assert all(t.device.type == "cpu" for inp in inputs for t in _tensors((inp.hidden, inp.kwargs)))
    assert Calibration().device_for(module) == torch.device("cpu")
    assert Calibration(store_device="auto").device_for(module) == module.device


def test_capture_stops_at_first_block(tiny_dirs, calib):
    module = CausalLM(str(tiny_dirs["llama"]))
    _, blocks = find_blocks(module.model)
    calls = []
    handles = [b.register_forward_pre_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    handles.append(module.model.lm_head.register_forward_pre_hook(lambda *a: calls.append("head")))
    module.prunable_blocks(calib)
    for h in handles:
        h.remove()
    # all blocks get the same masks and rotary embeddings: the first sample runs up to the last block
    # (to learn that), the others stop at the first; later blocks' bodies and the head never run
    assert calls == [0, 1] + [0] * (NSAMPLES - 1)


def test_blocks_with_their_own_arguments_get_them(tiny_dirs, calib):
    """Gemma-2 alternates sliding-window (block 0) and full attention (block 1): the masks differ, and
    each block must be replayed with its own, not block 0's (the engine-vs-slow test checks the masks)."""
    module = CausalLM(str(tiny_dirs["gemma2"]))
    _, blocks = find_blocks(module.model)
    given = []
    handles = [b.register_forward_pre_hook(lambda m, a, k, i=i: given.append((i, k)), with_kwargs=True)
               for i, b in enumerate(blocks)]
    module.model(calib[:1], use_cache=False)
    for h in handles:
        h.remove()
    masks = [k["attention_mask"] for _, k in given]
    assert masks[0] is not None and not torch.equal(masks[0], masks[1])
    _, inputs = module.prunable_blocks(calib)
    assert all(inp.per_block is not None for inp in inputs)
    for b, m in zip(blocks, masks):
        assert torch.equal(inputs[0].per_block[id(b)][1]["attention_mask"], m)
    # a uniform model keeps one copy per sample
    llama = CausalLM(str(tiny_dirs["llama"]))
    assert all(inp.per_block is None for inp in llama.prunable_blocks(calib)[1])


# --------------------------------------------------------------------------- a keyword-only model
class KwBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, *, hidden_states, scale):
        return hidden_states + self.down(torch.relu(self.up(hidden_states))) * scale


class KwModel(nn.Module):
    """Blocks that take the hidden state (and a tensor argument) by keyword only."""

    def __init__(self, vocab=50, d=16, n=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(KwBlock(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        scale = torch.full((1,), 0.5)
        for b in self.layers:
            h = b(hidden_states=h, scale=scale)
        return self.head(h)


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_keyword_block_model(sparsity_type):
    torch.manual_seed(0)
    model, ref = KwModel(), KwModel()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(0))
    spec = SparsitySpec.parse(sparsity_type, 0.5)

    prefix, blocks = find_blocks(model)
    assert prefix == "layers"
    inputs = capture_inputs(model, blocks[0], ids.split(1), lambda m, x: m(x))
    assert all(inp.key == "hidden_states" and set(inp.kwargs) == {"scale"} for inp in inputs)
    named = [(f"{prefix}.{i}", b) for i, b in enumerate(blocks)]
    result = prune_sequential(named, inputs, lambda name, b: select_targets(b, name), get_method("wanda"), spec,
                              progress=False)
    assert sorted(result.masks) == [f"layers.{i}.{n}" for i in range(3) for n in ("down", "up")]

    expected = {}
    for i, block in enumerate(ref.layers):
        layers = {f"layers.{i}.{n}": m for n, m in block.named_modules() if is_linear(m)}
        sq = full_forward_sq_sums(ref, ids, layers)
        for name, m in layers.items():
            score = m.weight.detach().abs() * torch.sqrt(sq[name] / ids.shape[0])
            expected[name] = slow_mask(score, spec)
            with torch.no_grad():
                m.weight[expected[name]] = 0
    assert_same_masks(result.masks, expected)
    assert_same_weights(model, ref)
