"""wanda_pl command line: ``python cli.py {prune,sweep,validate,fit,assets} --help``.

Every command of ours is one entry of ``COMMANDS``: LightningCLI's subcommands, the output-folder
checks and the hooks around a run all derive from it. A subcommand runs the WandaTrainer method of
its name (LightningCLI's contract: the method's signature and docstring are its options and
--help); ``assets`` needs no model, so it runs before LightningCLI parses anything.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import lightning as L
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from wanda_pl.callbacks import Calibration, Distillation, Pruning, ZeroShot


class WandaTrainer(Trainer):
    def prune(self, model, datamodule, output_dir: str = "outputs/prune", save_model: bool = False,
              validate_dense: bool = True, resume: bool = False, checkpoints: bool = True,
              run_config: Optional[dict] = None) -> dict:
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
            run_config: the run's whole configuration, recorded in the report (given by the CLI, not an option).
        """
        from wanda_pl.commands.prune import prune

        return prune(self, model, datamodule, output_dir, save_model, validate_dense, config=run_config,
                     resume=resume, checkpoints=checkpoints)

    def sweep(self, model, datamodule, grid=None, output_dir: str = "outputs/sweep", save_model: bool = False,
              run_config: Optional[dict] = None) -> dict:
        """Prune at every point of a grid of methods x ratios x types; tables and plots of all points.

        Writes sweep.csv, sweep.json, ppl_vs_sparsity.png and one subfolder per point into
        output_dir; an interrupted sweep resumes.

        Args:
            grid: the points (``wanda_pl.commands.sweep.Grid``; on the command line ``--sweep.*``).
            output_dir: the sweep's folder (one subfolder per point); a finished point with the same
                settings is kept, not run again. Same ownership rules as prune's output_dir.
            save_model: also save every point's pruned model (with its model card).
            run_config: the run's whole configuration, recorded in the reports (given by the CLI, not an option).
        """
        from wanda_pl.commands.sweep import sweep

        return sweep(self, model, datamodule, grid, output_dir, save_model, config=run_config)

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path: Optional[str] = None,
            weights_only: Optional[bool] = None, output_dir: Optional[str] = "outputs/fit", save_model: bool = True,
            validate_before: bool = True, run_config: Optional[dict] = None):
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
            run_config: the run's whole configuration, recorded in the report (given by the CLI, not an option).
        """
        if output_dir is None or datamodule is None or train_dataloaders is not None:
            return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)
        from wanda_pl.commands.fit import fit_and_report

        def plain_fit(m, datamodule, ckpt_path):
            super(WandaTrainer, self).fit(m, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)

        return fit_and_report(self, model, datamodule, plain_fit, output_dir, ckpt_path, save_model, validate_before,
                              config=run_config)


@dataclass(frozen=True)
class Group:
    """A dataclass of options shown as ``--<key>.*`` and given to the method as one argument. Added
    per subcommand, not to the method's signature: scripts rely on the names (``--sweep.*``), and a
    method argument cannot share its subcommand's name."""

    key: str
    argument: str
    load: Callable[[], type]  # imported when the parser is built


@dataclass(frozen=True)
class Command:
    """What the CLI does around one command.

    skip: the method's arguments the CLI fills in itself; never options.
    reports: the command writes output_dir (report.json, which records the run's config): the folder
        is checked and locked before any model loads, and the method gets the config as ``run_config``.
    group: options of a dataclass (sweep's grid), see ``Group``.
    before_check: called with output_dir before that check (the sweep takes back a killed point).
    standalone: a command that needs no model: called with the rest of argv before LightningCLI.
    callbacks: (key, class) of callbacks only this command has, as ``--<key>.*`` (fit's ``distill``).
    """

    skip: frozenset = frozenset({"model", "datamodule"})
    reports: bool = False
    group: Optional[Group] = None
    before_check: Optional[Callable[[str], None]] = None
    standalone: Optional[Callable[[List[str]], None]] = None
    callbacks: tuple = ()

    def skipped(self) -> set:
        """The method's arguments that are not options (its value in ``WandaCLI.subcommands()``)."""
        names = set(self.skip)
        if self.reports:
            names.add("run_config")
        if self.group is not None:
            names.add(self.group.argument)
        return names


def _grid() -> type:
    from wanda_pl.commands.sweep_grid import Grid

    return Grid


def _adopt_committed(output_dir: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from wanda_pl.commands.sweep import adopt_committed

        adopt_committed(output_dir)  # a point a kill caught between its commit and the claim


def _assets(argv: List[str]) -> None:
    from wanda_pl.assets.registry import ensure_all

    if argv:
        print("usage: python cli.py assets   (fetch and verify every embedded asset; prints {name: path} as JSON)",
              file=sys.stderr)
        sys.exit(2)  # a usage error, as every other
    print(json.dumps(ensure_all(), indent=2))


# Lightning's validate, test and predict run as they are; fit is Lightning's with a report.
COMMANDS = {
    "fit": Command(skip=frozenset(LightningCLI.subcommands()["fit"]), reports=True,
                   callbacks=(("distill", Distillation),)),
    "prune": Command(reports=True),
    "sweep": Command(reports=True, group=Group("sweep", "grid", _grid), before_check=_adopt_committed),
    "assets": Command(standalone=_assets),
}


class WandaCLI(LightningCLI):
    only: Optional[str] = None  # the subcommand the command line names first: the one parser built

    @staticmethod
    def subcommands():
        ours = {name: command.skipped() for name, command in COMMANDS.items() if command.standalone is None}
        return {**LightningCLI.subcommands(), **ours}

    def _add_subcommands(self, parser, **kwargs) -> None:
        """Only the named subcommand's parser: building all six is most of a run's start-up on a small
        model (~1 s). Without a subcommand first (``--help``, a typo) every one is built, as Lightning does."""
        if self.only not in self.subcommands():
            return super()._add_subcommands(parser, **kwargs)
        self._subcommand_parsers = {}
        trainer_class = self.trainer_class
        description = (inspect.getdoc(getattr(trainer_class, self.only)) or "").split("\n")[0]
        sub_kwargs = {"description": description, **kwargs.get(self.only, {})}
        self._subcommand_parsers[self.only] = self._prepare_subcommand_parser(trainer_class, self.only, **sub_kwargs)
        parser.add_subcommands().add_subcommand(self.only, self._subcommand_parsers[self.only], help=description)

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        group = getattr(COMMANDS.get(subcommand), "group", None)
        if group is not None:
            parser.add_class_arguments(group.load(), group.key, as_group=False)
        for key, callback in getattr(COMMANDS.get(subcommand), "callbacks", ()):
            parser.add_lightning_class_args(callback, key)
        return parser

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        command = COMMANDS.get(subcommand)
        if command is not None and command.group is not None:
            cls, value = command.group.load(), self.config_init[subcommand][command.group.key]
            kwargs[command.group.argument] = value if isinstance(value, cls) else cls(**dict(vars(value)))
        if command is not None and command.reports:
            # JSON as the report stores it: paths and other objects as their strings.
            kwargs["run_config"] = json.loads(json.dumps(self.config[subcommand].as_dict(), default=str))
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
        command, cfg = COMMANDS.get(self.subcommand), self.config[self.subcommand]
        if command is None or not command.reports or cfg.get("output_dir") is None:
            return
        from wanda_pl.commands.lock import check_free
        from wanda_pl.commands.outputs import check_output_dir, config_inputs

        if command.before_check is not None:
            command.before_check(cfg.output_dir)
        out = check_output_dir(cfg.output_dir, config_inputs(cfg.as_dict()),
                               writes={"trainer.default_root_dir": cfg.trainer.get("default_root_dir")})
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            # Only rank 0 writes and locks; the ranks Lightning starts later would find its lock held.
            check_free(out, cfg.output_dir)


def main(args: Optional[list] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    logging.basicConfig(level=os.environ.get("WANDA_PL_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A deprecation inside Lightning's own pytree helper, printed on every run; nothing for users to act on.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None and command.standalone is not None:
        command.standalone(argv[1:])
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
    argv = sys.argv[1:] if args is None else args
    WandaCLI.only = argv[0] if argv else None
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
