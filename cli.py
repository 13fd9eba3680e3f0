"""wanda_pl command line: ``python cli.py {prune,sweep,validate,fit,assets} --help``.

Subcommands are Trainer methods (LightningCLI's contract); ``prune`` and ``sweep`` are ours.
``assets`` needs no model, so it is dispatched before LightningCLI parses anything.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Optional

import lightning as L
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from wanda_pl.callbacks import Calibration, Pruning, ZeroShot


class WandaTrainer(Trainer):
    def prune(self, model, datamodule, output_dir: str = "outputs/prune", save_model: bool = False,
              validate_dense: bool = True, resume: bool = False, checkpoints: bool = True) -> dict:
        """Calibrate, prune, validate dense and pruned, write report.json.

        Args:
            output_dir: where report.json, calibration_ids.pt and (with save_model) the pruned model go;
                written atomically when the run succeeds. Only a new or empty folder or an earlier
                output of ours is replaced; any other folder, the working directory, the home folder
                and folders holding an input are refused before any work.
            save_model: also save the pruned model as a Hugging Face folder (output_dir/model).
            validate_dense: measure the dense perplexity first (the baseline in the report).
            resume: continue an interrupted run (same command and settings) after the last block it
                finished, from the staging folder ``.<output_dir name>.wanda_pl-resume`` beside output_dir.
            checkpoints: checkpoint every finished block there (weights, masks, the next block's
                activations) so that ``--resume true`` can continue a killed run; deleted on success.
        """
        from wanda_pl.commands.prune import prune

        return prune(self, model, datamodule, output_dir, save_model, validate_dense, getattr(self, "run_config", None),
                     resume=resume, checkpoints=checkpoints)

    def sweep(self, model, datamodule, grid=None, output_dir: str = "outputs/sweep", save_model: bool = False) -> dict:
        """Prune at every point of a grid of methods x ratios x types; tables and plots of all points.

        Writes sweep.csv, sweep.json, ppl_vs_sparsity.png and one subfolder per point into
        output_dir; an interrupted sweep resumes.

        Args:
            grid: the points (``wanda_pl.commands.sweep.Grid``; on the command line ``--sweep.*``).
            output_dir: the sweep's folder (one subfolder per point); a finished point with the same
                settings is kept, not run again. Same ownership rules as prune's output_dir.
            save_model: also save every point's pruned model (with its model card).
        """
        from wanda_pl.commands.sweep import sweep

        return sweep(self, model, datamodule, grid, output_dir, save_model, getattr(self, "run_config", None))

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path: Optional[str] = None,
            weights_only: Optional[bool] = None, output_dir: Optional[str] = "outputs/fit", save_model: bool = True,
            validate_before: bool = True):
        """Fine-tune (masks kept exactly: pruned at the start, --pruning.masks_from, or the checkpoint's)
        and write report.json: sparsity and metrics before and after, steps, time, mode, config.

        Args:
            ckpt_path: resume from this checkpoint (weights, optimizer, masks).
            weights_only: passed to Lightning's checkpoint loading.
            output_dir: where report.json, masks.pt, model/ (LoRA: merged with the masked merge) and
                adapter/ (LoRA: unmerged adapters + masks) go; written atomically, under the same
                rules as prune's output_dir. null: Lightning's
                plain fit, no report (also when no datamodule is given).
            save_model: save the fine-tuned model as a Hugging Face folder (output_dir/model).
            validate_before: measure the metrics before fine-tuning (skipped when resuming).
        """
        if output_dir is None or datamodule is None or train_dataloaders is not None:
            return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)
        from wanda_pl.commands.fit import fit_and_report

        def plain_fit(m, datamodule, ckpt_path):
            super(WandaTrainer, self).fit(m, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)

        return fit_and_report(self, model, datamodule, plain_fit, output_dir, ckpt_path, save_model, validate_before,
                              getattr(self, "run_config", None))


class WandaCLI(LightningCLI):
    @staticmethod
    def subcommands():
        return {**LightningCLI.subcommands(), "prune": {"model", "datamodule"},
                "sweep": {"model", "datamodule", "grid"}}

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        # The grid's options are --sweep.* (scripts rely on the names), and a method argument
        # cannot share its subcommand's name: they are added here, for this subcommand only.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "sweep":
            from wanda_pl.commands.sweep import Grid

            parser.add_class_arguments(Grid, "sweep", as_group=False)
        return parser

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "sweep":
            from wanda_pl.commands.sweep import Grid

            grid = self.config_init[subcommand]["sweep"]
            kwargs["grid"] = grid if isinstance(grid, Grid) else Grid(**dict(vars(grid)))
        return kwargs

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Pruning, "pruning")
        parser.add_lightning_class_args(Calibration, "calibration")
        parser.add_lightning_class_args(ZeroShot, "zero_shot")
        parser.link_arguments("seed_everything", "data.init_args.seed")
        # The embedded LLM job is the default; a recipe picks another class (e.g. configs/vision/).
        parser.set_defaults({
            "model": {"class_path": "wanda_pl.modules.causal_lm.CausalLM"},
            "data": {"class_path": "wanda_pl.data.text_module.TextDataModule"},
        })

    def before_instantiate_classes(self) -> None:
        """Refuse an output folder the run may not replace before any model is loaded."""
        cfg = self.config[self.subcommand]
        if self.subcommand in ("prune", "fit", "sweep") and cfg.get("output_dir") is not None:
            from wanda_pl.commands.lock import check_free
            from wanda_pl.commands.outputs import check_output_dir, config_inputs

            if self.subcommand == "sweep" and os.environ.get("LOCAL_RANK", "0") == "0":
                from wanda_pl.commands.sweep import adopt_committed

                adopt_committed(cfg.output_dir)  # a point a kill caught between its commit and the claim
            out = check_output_dir(cfg.output_dir, config_inputs(cfg.as_dict()),
                                   writes={"trainer.default_root_dir": cfg.trainer.get("default_root_dir")})
            if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
                # Only rank 0 writes and locks; the ranks Lightning starts later would find its lock held.
                check_free(out, cfg.output_dir)

    def before_prune(self) -> None:
        cfg = self.config[self.subcommand]
        self.trainer.run_config = json.loads(json.dumps(cfg.as_dict(), default=str))

    before_fit = before_sweep = before_prune


def main(args: Optional[list] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    logging.basicConfig(level=os.environ.get("WANDA_PL_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A deprecation inside Lightning's own pytree helper, printed on every run; nothing for users to act on.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    if argv[:1] == ["assets"]:
        from wanda_pl.assets.registry import ensure_all

        if len(argv) > 1:
            print("usage: python cli.py assets   (fetch and verify every embedded asset; prints {name: path} as JSON)",
                  file=sys.stderr)
            sys.exit(2)  # a usage error, as every other
        print(json.dumps(ensure_all(), indent=2))
        return
    from wanda_pl.errors import USER_ERROR_EXIT, debug, interruptible, interruption, user_message

    try:
        with interruptible():
            _run_cli(args)
    except BaseException as err:  # noqa: BLE001 - sorted below: user errors and signals get one line, crashes re-raise
        stop = interruption(err)
        message = str(stop) if stop is not None else None
        if stop is None and isinstance(err, Exception):
            message = user_message(err) or (_union_errors(str(err)) if isinstance(err, ValueError) else None)
        if message is None or debug():
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code if stop is not None else USER_ERROR_EXIT)


def _union_errors(message: str) -> Optional[str]:
    """The real reason inside jsonargparse's "Does not validate against any of the Union subtypes"
    (how subclass mode reports an error raised by a --model.* / --data.* constructor), or None."""
    if not message.startswith("Does not validate against any of the Union subtypes"):
        return None
    body = message.split("Errors:", 1)[-1].split("\nGiven value type:", 1)[0]
    reasons = [line.strip()[2:] for line in body.splitlines() if line.strip().startswith("- ")]
    reasons = [r for r in reasons if not r.startswith("Expected a <class 'NoneType'>")]
    return "\n".join(reasons) or None


def _run_cli(args: Optional[list]) -> None:
    WandaCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=WandaTrainer,
        seed_everything_default=0,
        save_config_callback=None,
        trainer_defaults={
            "accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
            "use_distributed_sampler": False, "num_sanity_val_steps": 0, "enable_model_summary": False,
        },
        args=args,
    )


if __name__ == "__main__":
    main()
