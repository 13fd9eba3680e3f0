"""LightningDataModule for causal-LM calibration, evaluation and fine-tuning text."""
from __future__ import annotations

import logging
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from .counts import check_at_least, my_share, rank_world
from .text import calibration_windows, check_token_ids, evaluation_windows, load_text

log = logging.getLogger(__name__)


class TextDataModule(L.LightningDataModule):
    """Calibration windows and evaluation windows of token ids.

    Args:
        calibration: text source for calibration (and fine-tuning): ``wikipedia`` | ``wikitext2`` | ``c4`` | a path.
        evaluation: text source for perplexity, same choices.
        nsamples: number of calibration windows.
        seqlen: tokens per window, for calibration and evaluation alike.
        seed: seed of the calibration sampling (``random.seed`` as the reference); linked to ``seed_everything``.
        max_eval_windows: evaluate only the first windows (None: all of them, as the paper).
        batch_size: windows per evaluation / training batch.
        train: text source for fine-tuning, the same choices (None: the calibration windows). Its
            ``nsamples`` windows are drawn from the source's training split (a file: refused when it
            is the evaluation file), so they never overlap the evaluation windows.
    """

    def __init__(
        self,
        calibration: str = "wikipedia",
        evaluation: str = "wikipedia",
        nsamples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        max_eval_windows: Optional[int] = None,
        batch_size: int = 1,
        train: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_at_least(nsamples=(nsamples, 1), seqlen=(seqlen, 2), max_eval_windows=(max_eval_windows, (1, None)),
                       batch_size=(batch_size, 1))
        self.calibration, self.evaluation = calibration, evaluation
        self.nsamples, self.seqlen, self.seed = nsamples, seqlen, seed
        self.max_eval_windows, self.batch_size, self.train = max_eval_windows, batch_size, train
        if train is not None and _same_file(train, evaluation):
            raise ValueError(f"data.train {train!r} is the evaluation file: its windows would overlap the evaluation; "
                             f"give another file (or a source with a training split: wikipedia, wikitext2, c4)")
        self._train: Optional[torch.Tensor] = None
        self.tokenizer, self.vocab_size = None, None
        self._calib: Optional[torch.Tensor] = None
        self._eval: Optional[torch.Tensor] = None

    def connect(self, tokenizer, max_length: Optional[int] = None, vocab_size: Optional[int] = None) -> None:
        """Late facts from the model: its tokenizer, the longest sequence it supports, and how many
        token ids it embeds (None: the tokenizer's)."""
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        if max_length is not None and self.seqlen > max_length:
            raise ValueError(f"data.seqlen={self.seqlen} is longer than the model supports ({max_length} positions)")

    def prepare_for(self, module) -> None:
        """Connect to ``module`` and load the data, so bad settings fail before any long work."""
        self.connect(module.tokenizer, module.max_length, _embedded(module.model))
        self.calibration_ids()
        self.evaluation_ids()
        self.train_ids()

    def setup(self, stage: str) -> None:
        if self.tokenizer is None and self.trainer is not None:
            module = self.trainer.lightning_module
            self.connect(module.tokenizer, module.max_length, _embedded(module.model))

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule has no tokenizer yet: call connect(tokenizer) or attach it to a Trainer")

    def _load(self, source: str, split: str):
        text = load_text(source, split)
        if isinstance(text, torch.Tensor):
            check_token_ids(text, self.vocab_size or len(self.tokenizer), source)
        return text

    def calibration_ids(self) -> torch.Tensor:
        """(nsamples, seqlen) token ids, drawn once and kept (the exact ids calibrated on)."""
        if self._calib is None:
            self._need_tokenizer()
            text = self._load(self.calibration, "calibration")
            self._calib = calibration_windows(text, self.tokenizer, self.nsamples, self.seqlen, self.seed)
        return self._calib

    calibration_data = calibration_ids  # the name the calibration callback asks every datamodule for

    def train_ids(self) -> torch.Tensor:
        """(nsamples, seqlen) fine-tuning windows: the calibration ones unless ``train`` names a source."""
        if self.train is None:
            return self.calibration_ids()
        if self._train is None:
            self._need_tokenizer()
            self._train = calibration_windows(self._load(self.train, "calibration"), self.tokenizer, self.nsamples,
                                              self.seqlen, self.seed)
        return self._train

    def evaluation_ids(self) -> torch.Tensor:
        if self._eval is None:
            self._need_tokenizer()
            text = self._load(self.evaluation, "evaluation")
            self._eval = evaluation_windows(text, self.tokenizer, self.seqlen, self.max_eval_windows)
        return self._eval

    def val_dataloader(self) -> DataLoader:
        ids = self.evaluation_ids()
        _, world = rank_world(self.trainer)
        if len(ids) < world:
            # A rank without batches skips validation and the others would wait for it forever.
            raise ValueError(f"{len(ids)} evaluation windows cannot be shared by {world} processes; "
                             "give more evaluation text, a shorter seqlen or fewer devices")
        idx = torch.tensor(my_share(len(ids), self.trainer), dtype=torch.long)
        return DataLoader(TensorDataset(ids[idx]), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        ids = self.train_ids()
        idx = torch.tensor(my_share(len(ids), self.trainer), dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(ids[idx]), batch_size=self.batch_size, shuffle=True, generator=gen)

    def describe(self) -> dict:
        return {
            "calibration": self.calibration, "evaluation": self.evaluation, "nsamples": self.nsamples,
            "seqlen": self.seqlen, "seed": self.seed, "max_eval_windows": self.max_eval_windows,
            "eval_windows": None if self._eval is None else len(self._eval),
            **({"train": self.train} if self.train is not None else {}),
        }



def _same_file(a: str, b: str) -> bool:
    from pathlib import Path

    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_file() and pb.is_file() and pa.resolve() == pb.resolve()


def _embedded(network) -> int:
    """Rows of the Hugging Face model's input embedding: the token ids it can take."""
    return network.get_input_embeddings().num_embeddings
