"""Sequential onloading's disk side: an empty model filled block by block from safetensors, written back
shard by shard, equal to from_pretrained / save_pretrained bit for bit."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from conftest import tiny_config
from wanda_pl.errors import UserError
from wanda_pl.families.hf_causal import named_blocks
from wanda_pl.families.hf_shards import (checkpoint_index, empty_causal_lm, load_into,
                                          outside_blocks, state_of, unload)
from wanda_pl.families.hf_writer import ShardWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("llama", "gpt2", "opt", "gemma2", "mixtral", "qwen2_moe", "deepseek_v3")
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 3, 7]])


def reference(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def assert_same_model(model, ref):
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].device.type == "cpu" and got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    for k, b in ref.named_buffers():  # non-persistent ones (rotary inv_freq) are not in state_dict
        assert torch.equal(dict(model.named_buffers())[k], b), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)


def tied_like_reference(model, ref):
    def groups(m):
        ids = {}
        for n, p in m.named_parameters(remove_duplicate=False):
            ids.setdefault(id(p), []).append(n)
        return sorted(sorted(v) for v in ids.values() if len(v) > 1)
    return groups(model) == groups(ref)


def blocks_and_rest(model):
    blocks = [name for name, _ in named_blocks(model)]
    return blocks, outside_blocks(model, blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_empty_model_holds_no_weights(tiny_dirs, family):
    from transformers import AutoModelForCausalLM

    model = empty_causal_lm(tiny_dirs[family], torch.bfloat16)
    params = list(model.parameters())
    assert params and all(p.is_meta and not p.requires_grad for p in params)
    # bfloat16 as asked, but where the family keeps a module in float32 (DeepSeek's router), as from_pretrained
    want = {n: p.dtype for n, p in AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.bfloat16)
            .named_parameters()}
    assert {n: p.dtype for n, p in model.named_parameters()} == want
    assert all(not b.is_meta for b in model.buffers())
    assert not model.training and model.config.use_cache is False
    assert len(named_blocks(model)) == 2


def test_a_large_empty_model_takes_no_memory(tmp_path):
    import transformers as tf

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    # ~130M parameters: 520 MB were they real
    tf.LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                   vocab_size=32000).save_pretrained(tmp_path)
    before = rss()
    model = empty_causal_lm(tmp_path, torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 120_000_000
    assert rss() - before < 150 * 2**20


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_the_whole_model_equals_from_pretrained(tiny_dirs, family):
    model = empty_causal_lm(tiny_dirs[family], torch.float32)
    load_into(model, [""], checkpoint_index(tiny_dirs[family]))
    ref = reference(tiny_dirs[family])
    assert_same_model(model, ref)
    assert tied_like_reference(model, ref)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_block_by_block_then_the_rest_equals_from_pretrained(tiny_dirs, family):
    model = empty_causal_lm(tiny_dirs[family], torch.float32)
    index = checkpoint_index(tiny_dirs[family])
    blocks, rest = blocks_and_rest(model)
    assert rest and not set(rest) & set(blocks)
    for name in blocks:
        load_into(model, [name], index)
        assert all(not p.is_meta for p in model.get_submodule(name).parameters())
    assert any(p.is_meta for p in model.parameters())
    load_into(model, rest, index)
    ref = reference(tiny_dirs[family])
    assert_same_model(model, ref)
    assert tied_like_reference(model, ref)


def test_load_casts_to_the_dtype_asked(tiny_dirs):
    model = empty_causal_lm(tiny_dirs["llama"], torch.float32)
    load_into(model, ["model.layers.0"], checkpoint_index(tiny_dirs["llama"]), dtype=torch.bfloat16)
    ref = reference(tiny_dirs["llama"]).model.layers[0]
    for (n, p), (_, q) in zip(model.model.layers[0].named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)), n


def test_load_keeps_the_float32_modules_of_a_family_float32(tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = empty_causal_lm(tiny_dirs["deepseek_v3"], torch.bfloat16)
    load_into(model, [""], checkpoint_index(tiny_dirs["deepseek_v3"]), dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs["deepseek_v3"], dtype=torch.bfloat16).eval()
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32  # the router: float32 in DeepSeek
    assert_same_model(model, ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unload_frees_one_block_and_leaves_the_others(tiny_dirs, family):
    model = empty_causal_lm(tiny_dirs[family], torch.float32)
    load_into(model, [""], checkpoint_index(tiny_dirs[family]))
    blocks, _ = blocks_and_rest(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    unload(model, [blocks[0]])
    for k, v in model.state_dict().items():
        if k.startswith(blocks[0] + "."):
            assert v.is_meta, k
        else:
            assert not v.is_meta and torch.equal(v, before[k]), k
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    load_into(model, [blocks[0]], checkpoint_index(tiny_dirs[family]))  # and it comes back
    assert_same_model(model, reference(tiny_dirs[family]))


def test_unload_keeps_a_tied_weight_a_loaded_module_still_holds(tiny_dirs):
    model = empty_causal_lm(tiny_dirs["gpt2"], torch.float32)
    load_into(model, ["lm_head"], checkpoint_index(tiny_dirs["gpt2"]))
    assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.is_meta
    unload(model, ["lm_head"])  # the embedding still holds it
    assert not model.transformer.wte.weight.is_meta and model.lm_head.weight is model.transformer.wte.weight
    unload(model, ["lm_head", "transformer.wte"])
    assert model.transformer.wte.weight.is_meta and model.lm_head.weight is model.transformer.wte.weight


def test_a_checkpoint_with_different_tied_values_loads_untied_as_from_pretrained(tiny_dirs, tmp_path):
    """Both names in the file, different values: from_pretrained does not tie them, and neither do we."""
    import shutil

    for f in tiny_dirs["gpt2"].iterdir():
        shutil.copy(f, tmp_path / f.name)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] * 2
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = empty_causal_lm(tmp_path, torch.float32)
    load_into(model, [""], checkpoint_index(tmp_path))
    ref = reference(tmp_path)
    assert ref.lm_head.weight is not ref.transformer.wte.weight
    assert_same_model(model, ref)
    assert set(state_of(model, "")) == set(tensors)


def test_a_checkpoint_in_another_layout_is_renamed_as_from_pretrained_does(tiny_dirs, tmp_path):
    """GPT-2 as published: keys without the ``transformer.`` base-model prefix."""
    import shutil

    for f in tiny_dirs["gpt2"].iterdir():
        shutil.copy(f, tmp_path / f.name)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = empty_causal_lm(tmp_path, torch.float32)
    load_into(model, [""], checkpoint_index(tmp_path))
    assert_same_model(model, reference(tiny_dirs["gpt2"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_state_of_has_save_pretrained_keys(tiny_dirs, family):
    model = empty_causal_lm(tiny_dirs[family], torch.float32)  # meta: keys only
    keys = set()
    blocks, rest = blocks_and_rest(model)
    for name in blocks + rest:
        part = state_of(model, name)
        assert not keys & set(part)
        keys |= set(part)
    assert keys == set(checkpoint_index(tiny_dirs[family]))  # the conftest folder is save_pretrained's
    assert keys == set(state_of(model, ""))
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in keys and "lm_head.weight" in state_of(model, "lm_head", tied_skip=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_folder_written_shard_by_shard_equals_save_pretrained(tiny_dirs, tokenizer, tmp_path, family):
    src = tiny_dirs[family]
    model = empty_causal_lm(src, torch.float32)
    index = checkpoint_index(src)
    blocks, rest = blocks_and_rest(model)
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, len(blocks) + 1)
    for name in blocks:
        load_into(model, [name], index)
        path = writer.add(state_of(model, name))
        assert path.name == f"model-{blocks.index(name) + 1:05d}-of-{len(blocks) + 1:05d}.safetensors"
        unload(model, [name])
        assert all(p.is_meta for p in model.get_submodule(name).parameters())
    load_into(model, rest, index)
    writer.add({k: v for name in rest for k, v in state_of(model, name).items()})
    writer.finish(model.config, tokenizer, model.generation_config)

    saved = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(saved["weight_map"]) == set(index)
    assert saved["metadata"]["total_size"] == sum((out / f).stat().st_size for f in set(saved["weight_map"].values())) \
        - sum(8 + int.from_bytes((out / f).read_bytes()[:8], "little") for f in set(saved["weight_map"].values()))
    with safe_open(str(next(out.glob("model-00001-*"))), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    ref = reference(src)
    assert_same_model(reference(out), ref)
    assert checkpoint_index(out).keys() == index.keys()
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_one_shard_is_model_safetensors_without_an_index(tiny_dirs, tmp_path):
    model = empty_causal_lm(tiny_dirs["opt"], torch.float32)
    load_into(model, [""], checkpoint_index(tiny_dirs["opt"]))
    writer = ShardWriter(tmp_path, 1)
    assert writer.add(state_of(model, "")).name == "model.safetensors"
    writer.finish(model.config)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert_same_model(reference(tmp_path), reference(tiny_dirs["opt"]))


def test_tied_entries_written_twice_get_their_own_memory(tiny_dirs, tmp_path):
    model = empty_causal_lm(tiny_dirs["gpt2"], torch.float32)
    load_into(model, [""], checkpoint_index(tiny_dirs["gpt2"]))
    writer = ShardWriter(tmp_path, 1)
    writer.add(state_of(model, "", tied_skip=False))
    writer.finish(model.config)
    assert "lm_head.weight" in checkpoint_index(tmp_path)
    assert_same_model(reference(tmp_path), reference(tiny_dirs["gpt2"]))


def test_a_sharded_checkpoint_is_indexed_and_loaded(tiny_dirs, tmp_path):
    reference(tiny_dirs["llama"]).save_pretrained(tmp_path, max_shard_size="20KB")
    files = set(checkpoint_index(tmp_path).values())
    assert len(files) > 3 and all(f.parent == tmp_path and f.name.startswith("model-000") for f in files)
    index = checkpoint_index(tmp_path)
    for key, file in index.items():
        with safe_open(str(file), framework="pt") as f:
            assert key in f.keys()
    model = empty_causal_lm(tmp_path, torch.float32)
    load_into(model, [""], index)
    assert_same_model(model, reference(tiny_dirs["llama"]))


def test_loose_safetensors_files_are_indexed(tiny_dirs, tmp_path):
    with safe_open(str(tiny_dirs["llama"] / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[:5]}, str(tmp_path / "a.safetensors"))
    save_file({k: tensors[k] for k in keys[5:]}, str(tmp_path / "b.safetensors"))
    index = checkpoint_index(tmp_path)
    assert sorted(index) == keys and index[keys[0]].name == "a.safetensors" and index[keys[-1]].name == "b.safetensors"


def test_folders_without_safetensors_are_refused(tiny_dirs, tmp_path):
    ref = reference(tiny_dirs["llama"])
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"(?s)pytorch_model\.bin.*safetensors.*safe_serialization=True") as err:
        checkpoint_index(tmp_path)
    assert str(tmp_path) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no \.safetensors weights \(found: nothing\)"):
        checkpoint_index(empty)
    with pytest.raises(UserError, match="does not exist"):
        checkpoint_index(tmp_path / "nowhere")
    with pytest.raises(UserError, match="config.json"):
        empty_causal_lm(empty, torch.float32)


def test_an_index_naming_a_missing_shard_is_refused(tiny_dirs, tmp_path):
    reference(tiny_dirs["llama"]).save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-00002-*")).unlink()
    with pytest.raises(UserError, match="model-00002-of"):
        checkpoint_index(tmp_path)


def test_a_missing_or_misshapen_tensor_is_refused_by_name(tiny_dirs):
    model = empty_causal_lm(tiny_dirs["llama"], torch.float32)
    index = checkpoint_index(tiny_dirs["llama"])
    missing = dict(index)
    del missing["model.layers.1.mlp.up_proj.weight"]
    load_into(model, ["model.layers.0"], missing)  # other blocks do not need it
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_into(model, ["model.layers.1"], missing)
    wrong = empty_causal_lm(tiny_dirs["llama"], torch.float32)
    wrong.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    with pytest.raises(UserError, match=r"(?s)model\.layers\.0\.mlp\.up_proj\.weight.*model\.safetensors.*\[3, 3\]"):
        load_into(wrong, ["model.layers.0"], index)


def test_the_writer_refuses_what_would_break_the_checkpoint(tmp_path):
    writer = ShardWriter(tmp_path, 2)
    writer.add({"a": torch.zeros(2), "b": torch.ones(2, 2).t()})  # a transposed view is written contiguous
    with pytest.raises(ValueError, match="written before.*a"):
        writer.add({"a": torch.zeros(2), "c": torch.zeros(1)})
    with pytest.raises(ValueError, match="only 1 of 2 shards"):
        writer.finish(tiny_config("llama"))
    writer.add({"c": torch.zeros(1)})
    with pytest.raises(ValueError, match="all 2 shards"):
        writer.add({"d": torch.zeros(1)})
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, 0)


def test_outside_blocks_names_the_rest_of_the_model(tiny_dirs):
    model = empty_causal_lm(tiny_dirs["llama"], torch.float32)
    assert outside_blocks(model, ["model.layers.0", "model.layers.1"]) == [
        "model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    mixed = torch.nn.Module()
    mixed.scale = torch.nn.Parameter(torch.ones(1))
    mixed.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="the model"):
        outside_blocks(mixed, ["layers.0", "layers.1"])


def test_keys_save_pretrained_ignores_are_left_out(tiny_dirs):
    model = empty_causal_lm(tiny_dirs["llama"], torch.float32)
    model._keys_to_ignore_on_save = {"model.norm.weight"}
    assert "model.norm.weight" not in state_of(model, "model.norm")
    assert "model.norm.weight" not in state_of(model, "")


def test_config_json_says_the_dtype_written(tiny_dirs, tmp_path):
    model = empty_causal_lm(tiny_dirs["llama"], torch.bfloat16)
    load_into(model, [""], checkpoint_index(tiny_dirs["llama"]))
    writer = ShardWriter(tmp_path, 1)
    writer.add(state_of(model, ""))
    config = AutoConfig.from_pretrained(tiny_dirs["llama"])  # as the folder read says: float32
    writer.finish(config)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert str(config.dtype).endswith("float32")  # the caller's config is not changed
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
