"""The paper's hub text sources (``wikitext2``, ``c4``) and ``.jsonl`` files, offline.

``datasets.load_dataset`` is replaced by a fake that serves small real text in the hub's shapes:
WikiText-2 raw (train/test/validation splits of lines, `` = Heading = `` lines and empty ones),
C4 ``en`` (document records with ``text``, ``timestamp``, ``url``; the train shard and the
validation shard the paper reads). Every result is compared with an independent transcription,
written here, of the reference's loaders (``random.seed(seed)`` and the module-level ``random``).
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import run_cli
from wanda_pl.data import text_module
from wanda_pl.data.text import calibration_windows, evaluation_windows, load_text
from wanda_pl.data.text_module import TextDataModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Real WikiText-2 raw lines (the opening of its train and test splits), in the hub's row format.
WIKI_TRAIN = [
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the "
    "Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ "
    "playing video game developed by Sega and Media.Vision for the PlayStation Portable . \n",
    " The game began development in 2010 , carrying over a large portion of the work done on Valkyria Chronicles "
    "II . While it retained the standard features of the series , it also underwent multiple adjustments . \n",
    "",
    " = = Gameplay = = \n",
    "",
    " As with previous Valkyira Chronicles games , Valkyria Chronicles III is a tactical role @-@ playing game "
    "where players take control of a military unit and take part in missions against enemy forces . \n",
]
WIKI_TEST = [
    "",
    " = Robert Boulter = \n",
    "",
    " Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role on the "
    "television series The Bill in 2000 . \n",
    " In 2006 , Boulter starred alongside Whishaw in the play Citizenship written by Mark Ravenhill . \n",
    "",
    " = = Career = = \n",
    "",
    " In 2000 Boulter had a guest @-@ starring role on the television series The Bill ; he portrayed Scott "
    "Parry in the episode \" In Safe Hands \" . \n",
]
WIKI_VALID = ["", " = Homarus gammarus = \n", "", " Homarus gammarus , known as the European lobster , is a species . \n"]

SENTENCES = [
    "Beginners BBQ Class Taking Place in Missoula!",
    "Do you want to get better at making delicious BBQ? You will have the opportunity, put this on your calendar now.",
    "Discussion in 'Mac OS X Lion (10.7)' started by axboi87, Jan 20, 2012.",
    "Foil plaid lycra and spandex shortall with metallic slinky insets. Attached metallic elastic belt with O-ring.",
    "How many backlinks per day for new site? I've got a 500pages website and I'm stuck.",
    "The Denver Board of Education opened the 2017-18 school year with an update on projects.",
    "Here is the latest news from the city council, which met on Tuesday evening.",
]


def c4_document(i: int, kind: str) -> dict:
    """A C4 record; lengths vary from a few words to many sentences, so that some documents are not
    longer than seqlen and the loop has to draw again."""
    n = (i * 7) % 9  # 0 .. 8 extra sentences
    if i % 5 == 0:  # a short one
        return {"text": f"Short {i}.", "timestamp": "2019-04-25T12:00:00Z", "url": f"https://example.org/{kind}/{i}"}
    text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(n + 1)) + f" [{kind} document {i}]"
    return {"text": text, "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z", "url": f"https://example.org/{kind}/{i}"}


C4_TRAIN = [c4_document(i, "train") for i in range(60)]
C4_VALID = [c4_document(i, "validation") for i in range(1200)]  # more than the 1100 the paper keeps


@pytest.fixture
def hub(monkeypatch):
    """``datasets.load_dataset`` answering only the calls the paper's loaders make; records them."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split=None, data_files=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "data_files": data_files, **kwargs})
        if path == "wikitext" and name == "wikitext-2-raw-v1" and data_files is None:
            rows = {"train": WIKI_TRAIN, "test": WIKI_TEST, "validation": WIKI_VALID}[split]
            return datasets.Dataset.from_dict({"text": rows})
        if path == "allenai/c4" and name is None:
            if data_files == {"train": "en/c4-train.00000-of-01024.json.gz"} and split == "train":
                return datasets.Dataset.from_list(C4_TRAIN)
            if data_files == {"validation": "en/c4-validation.00000-of-00008.json.gz"} and split == "validation":
                return datasets.Dataset.from_list(C4_VALID)
        raise AssertionError(f"unexpected load_dataset call: {calls[-1]}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


# --------------------------------------------------------------------------- the reference, transcribed
def reference_stream_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """wikitext2 in the reference: one stream, ``random.randint(0, len - seqlen - 1)`` per window."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for _ in range(nsamples):
            i = random.randint(0, ids.shape[0] - seqlen - 1)
            out.append(ids[i:i + seqlen])
        return torch.stack(out)
    finally:
        random.setstate(state)


def reference_c4_windows(docs, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """c4 in the reference: a random document until one is longer than seqlen, then a random window."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for _ in range(nsamples):
            while True:
                i = random.randint(0, len(docs) - 1)
                enc = tokenizer(docs[i], return_tensors="pt")
                if enc.input_ids.shape[1] > seqlen:
                    break
            i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
            out.append(enc.input_ids[0, i:i + seqlen])
        return torch.stack(out)
    finally:
        random.setstate(state)


def reference_eval_windows(text: str, tokenizer, seqlen: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    return torch.stack([ids[w * seqlen:(w + 1) * seqlen] for w in range(n)])


def test_the_test_configuration_forces_offline_mode():
    """conftest sets both switches whatever the environment says (run with HF_HUB_OFFLINE=0 to see)."""
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"


# --------------------------------------------------------------------------- wikitext2
def test_wikitext2_joins_train_with_space_and_test_with_blank_lines(hub):
    assert load_text("wikitext2", "calibration") == " ".join(WIKI_TRAIN)
    assert load_text("wikitext2", "evaluation") == "\n\n".join(WIKI_TEST)
    assert [(c["path"], c["name"], c["split"]) for c in hub] == [
        ("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", "wikitext-2-raw-v1", "test")]


@pytest.mark.parametrize("seed", [0, 3])
def test_wikitext2_windows_equal_the_reference(hub, tokenizer, seed):
    seqlen, nsamples = 16, 6
    dm = TextDataModule("wikitext2", "wikitext2", nsamples=nsamples, seqlen=seqlen, seed=seed)
    dm.connect(tokenizer)
    stream = tokenizer(" ".join(WIKI_TRAIN), return_tensors="pt").input_ids[0]
    want = reference_stream_windows(stream, nsamples, seqlen, seed)
    assert torch.equal(dm.calibration_ids(), want)
    assert torch.equal(dm.evaluation_ids(), reference_eval_windows("\n\n".join(WIKI_TEST), tokenizer, seqlen))
    assert dm.describe()["eval_windows"] == len(dm.evaluation_ids())


# --------------------------------------------------------------------------- c4
def test_c4_calibration_documents_and_validation_first_1100(hub):
    docs = load_text("c4", "calibration")
    assert docs == [d["text"] for d in C4_TRAIN]  # the records' text field, in order, as documents
    evaluation = load_text("c4", "evaluation")
    assert evaluation == " ".join(d["text"] for d in C4_VALID[:1100])
    assert "[validation document 1099]" in evaluation and "[validation document 1100]" not in evaluation
    assert [(c["path"], c["split"]) for c in hub] == [("allenai/c4", "train"), ("allenai/c4", "validation")]


@pytest.mark.parametrize("seed,nsamples,seqlen", [(0, 8, 32), (5, 12, 48), (11, 4, 64)])
def test_c4_calibration_equals_the_reference_loop(hub, tokenizer, seed, nsamples, seqlen):
    lengths = [len(tokenizer(d["text"])["input_ids"]) for d in C4_TRAIN]
    assert min(lengths) <= seqlen < max(lengths)  # some draws must be rejected and drawn again
    dm = TextDataModule("c4", "c4", nsamples=nsamples, seqlen=seqlen, seed=seed)
    dm.connect(tokenizer)
    got = dm.calibration_ids()
    want = reference_c4_windows([d["text"] for d in C4_TRAIN], tokenizer, nsamples, seqlen, seed)
    assert got.dtype == torch.long and torch.equal(got, want)
    # another seed draws other windows (the seed is used)
    other = calibration_windows(load_text("c4", "calibration"), tokenizer, nsamples, seqlen, seed + 1)
    assert not torch.equal(other, got)
    valid = " ".join(d["text"] for d in C4_VALID[:1100])
    assert torch.equal(dm.evaluation_ids(), reference_eval_windows(valid, tokenizer, seqlen))


def test_c4_with_no_long_document_fails_clearly(hub, tokenizer):
    with pytest.raises(ValueError, match="almost no document is longer than seqlen=1000"):
        calibration_windows(load_text("c4", "calibration"), tokenizer, 2, 1000, 0)


def test_hub_failure_names_the_source_and_the_embedded_text(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network here")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load dataset 'c4'.*ConnectionError: no network here") as err:
        load_text("c4", "calibration")
    assert "wikipedia" in str(err.value)


# --------------------------------------------------------------------------- .jsonl files
def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
        f.write("\n")  # a trailing blank line is skipped
    return path


def test_jsonl_source_is_documents_like_c4(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", C4_TRAIN)
    docs = load_text(str(path), "calibration")
    assert docs == [d["text"] for d in C4_TRAIN]
    got = calibration_windows(docs, tokenizer, 8, 32, 4)
    assert torch.equal(got, reference_c4_windows(docs, tokenizer, 8, 32, 4))
    # evaluation: the documents joined with blank lines, as one stream
    ev = evaluation_windows(load_text(str(path), "evaluation"), tokenizer, 32)
    assert torch.equal(ev, reference_eval_windows("\n\n".join(docs), tokenizer, 32))


def test_jsonl_sources_through_the_prune_command(tiny_dirs, tokenizer, tmp_path):
    calib = write_jsonl(tmp_path / "calib.jsonl", C4_TRAIN)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", C4_VALID[:40])
    out = tmp_path / "out"
    error, _ = run_cli(["prune", "--model.name_or_path", str(tiny_dirs["llama"]),
                        "--data.calibration", str(calib), "--data.evaluation", str(evaluation),
                        "--data.nsamples", "6", "--data.seqlen", "32", "--data.max_eval_windows", "3",
                        "--seed_everything", "2", "--trainer.enable_progress_bar", "false", "--output_dir", str(out)])
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] == str(calib) and report["evaluation"] == str(evaluation)
    ids = torch.load(out / "calibration_ids.pt", weights_only=True)
    assert torch.equal(ids, reference_c4_windows([d["text"] for d in C4_TRAIN], tokenizer, 6, 32, 2))
    assert report["eval_windows"] == 3 and report["actual_sparsity"] == 0.5


def test_text_module_keeps_the_draw(hub, tokenizer, monkeypatch):
    """The windows are drawn once: a second call neither reloads nor redraws."""
    dm = TextDataModule("c4", "wikitext2", nsamples=4, seqlen=32, seed=0)
    dm.connect(tokenizer)
    first = dm.calibration_ids()
    monkeypatch.setattr(text_module, "load_text", lambda *a: pytest.fail("reloaded"))
    assert dm.calibration_ids() is first
    assert len(hub) == 1
