"""Text sources for calibration and perplexity, and the windows cut from them.

Sources: ``wikipedia`` and ``news`` (embedded, each split by article), ``wikitext2`` (hub,
``wikitext-2-raw-v1``: train joined with " " for calibration, test joined with "\\n\\n" for
evaluation, as the paper), ``c4`` (hub, ``allenai/c4`` ``en``: train shard 00000 documents
for calibration, the first 1100 validation documents for evaluation, as the paper), or a
path to ``.txt``, ``.jsonl`` (a ``text`` field) or ``.pt`` (token ids, for exact replay).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Optional, Union

import torch

from ..assets.resolve import EMBEDDED_TEXT, hub_error, looks_like_path
from ..errors import UserError

SPLITS = ("calibration", "evaluation")
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VALID = "en/c4-validation.00000-of-00008.json.gz"

# A source is either one token stream (a 1-D tensor), pre-cut windows (2-D tensor), or documents.
Text = Union[str, List[str], torch.Tensor]


def load_text(source: str, split: str) -> Text:
    """The raw text of ``source`` for ``split`` ('calibration' or 'evaluation')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source in EMBEDDED_TEXT:
        from ..assets.registry import ensure
        from ..assets.text import texts

        calib, evaluation = texts(ensure(source))
        return calib if split == "calibration" else evaluation
    if source == "wikitext2":
        return _hub_dataset(
            source, lambda ds: (" " if split == "calibration" else "\n\n").join(ds["text"]),
            "wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test",
        )
    if source == "c4":
        if split == "calibration":
            return _hub_dataset(source, lambda ds: list(ds["text"]), "allenai/c4", data_files={"train": C4_TRAIN}, split="train")
        return _hub_dataset(source, lambda ds: " ".join(ds[:1100]["text"]), "allenai/c4",
                            data_files={"validation": C4_VALID}, split="validation")
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl", ".pt") or looks_like_path(source) or path.exists():
        return _load_file(path)
    raise ValueError(
        f"unknown text source {source!r}: use one of {', '.join(EMBEDDED_TEXT)} (embedded), wikitext2, c4 (hub), "
        "or a path to a .txt, .jsonl or .pt file"
    )


def _hub_dataset(source, convert, *args, **kwargs):
    import datasets

    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - every hub failure gets the same advice
        raise hub_error("dataset", source, err, EMBEDDED_TEXT) from err
    return convert(ds)


def _load_file(path: Path) -> Text:
    if path.is_dir():
        raise UserError(f"text file {str(path)!r} is a folder; give a .txt, .jsonl or .pt file")
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    if path.suffix not in (".txt", ".jsonl", ".pt"):
        raise UserError(f"unsupported text file {str(path)!r}: use .txt, .jsonl or .pt")
    if path.suffix == ".pt":
        return _load_ids(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"text file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); give UTF-8 "
                        f"text, or token ids as a .pt file") from None
    if "\x00" in raw:  # valid UTF-8 all the same, but no text
        raise UserError(f"text file {str(path)!r} holds NUL bytes: a binary file, not text")
    if not raw.strip():
        raise UserError(f"text file {str(path)!r} is empty")
    return raw if path.suffix == ".txt" else _jsonl_docs(path, raw)


def _jsonl_docs(path: Path, raw: str) -> List[str]:
    docs = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}:{lineno}: not a JSON object ({err}); a .jsonl source has one "
                            f'{{"text": ...}} object per line') from None
        if not isinstance(row, dict) or "text" not in row:
            raise UserError(f"{path}:{lineno}: a .jsonl source needs a 'text' field in every line")
        if not isinstance(row["text"], str):
            raise UserError(f"{path}:{lineno}: the 'text' field is a {type(row['text']).__name__}, not a string")
        docs.append(row["text"])
    return docs


def _load_ids(path: Path) -> torch.Tensor:
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, not torch's, arbitrary objects: torch's messages omit the file
        raise UserError(f"{str(path)!r} is not a token-id file torch can load ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}); a .pt source holds one integer "
                        f"tensor, as an earlier run's calibration_ids.pt") from None
    what = f"a {type(ids).__name__}" if not isinstance(ids, torch.Tensor) else f"a {ids.dtype} tensor of shape {tuple(ids.shape)}"
    if not isinstance(ids, torch.Tensor) or ids.dtype not in ID_DTYPES or ids.dim() not in (1, 2) or ids.numel() == 0:
        raise UserError(f"{path}: a .pt source must hold a non-empty 1-D or 2-D integer tensor of token ids "
                        f"({', '.join(str(d) for d in ID_DTYPES)}), not {what}")
    return ids.long()


def check_token_ids(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    """Refuse ids the model cannot embed (they would end in an IndexError deep inside it)."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise UserError(f"token ids from {source!r} must be in [0, {vocab_size - 1}] (the model's vocabulary), "
                        f"but {bad.numel()} are not, e.g. {int(bad[0])}: made with another tokenizer?")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long stream of token ids (the tokenizer's usual special tokens, as the reference)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def calibration_windows(text: Text, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, drawn as the reference does with ``random.seed(seed)``:
    from a stream, a random start per window; from documents, a random document longer than
    ``seqlen`` and a random start inside it. A 2-D tensor is replayed as given."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be >= 1, got nsamples={nsamples}, seqlen={seqlen}")
    if isinstance(text, torch.Tensor) and text.dim() == 2:
        if text.shape[1] != seqlen or text.shape[0] < nsamples:
            raise ValueError(
                f"replayed calibration ids have shape {tuple(text.shape)}, need at least {nsamples} rows of seqlen={seqlen}"
            )
        return text[:nsamples].clone()
    rng = random.Random(seed)
    if isinstance(text, list):
        return _doc_windows(text, tokenizer, nsamples, seqlen, rng)
    ids = text if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)
    if ids.numel() <= seqlen:
        raise ValueError(f"too little calibration text: {ids.numel()} tokens, need more than seqlen={seqlen}")
    if ids.numel() < nsamples * seqlen:
        raise ValueError(
            f"too little calibration text for nsamples={nsamples} x seqlen={seqlen}: the text has only {ids.numel()} tokens "
            f"({ids.numel() // seqlen} non-overlapping windows); lower nsamples/seqlen or give more text"
        )
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def _doc_windows(docs: List[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    if not docs:
        raise ValueError("the calibration source has no documents")
    windows, tries = [], 0
    while len(windows) < nsamples:
        ids = tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)])
        tries += 1
        if ids.numel() > seqlen:
            s = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[s : s + seqlen])
        elif tries > 100 * nsamples + 1000:
            raise ValueError(f"too little calibration text: almost no document is longer than seqlen={seqlen} tokens")
    return torch.stack(windows)


def evaluation_windows(text: Text, tokenizer, seqlen: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows over the evaluation stream (``numel // seqlen`` of them, as the paper)."""
    if isinstance(text, torch.Tensor):
        ids = text.flatten()
    else:
        ids = tokenize(tokenizer, text if isinstance(text, str) else "\n\n".join(text))
    n = ids.numel() // seqlen
    if n < 1:
        raise ValueError(f"too little evaluation text: {ids.numel()} tokens, shorter than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
