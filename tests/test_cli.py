"""The prune command: early, clear errors; atomic outputs; exact replay; reloadable models; recipes, each
parsed under its own command; the command table in cli.py."""
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # cli.py lives at the repository root
    sys.path.insert(0, str(ROOT))

import wanda_pl.commands.prune as commands  # noqa: E402
from cli import main  # noqa: E402
from wanda_pl.assets.resolve import EMBEDDED_MODELS  # noqa: E402

SEQLEN, NSAMPLES, WINDOWS = 32, 4, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_args(model_dir, text_file, out, *extra):
    return [
        "prune",
        "--model.name_or_path", str(model_dir),
        "--data.calibration", str(text_file), "--data.evaluation", str(text_file),
        "--data.nsamples", str(NSAMPLES), "--data.seqlen", str(SEQLEN), "--data.max_eval_windows", str(WINDOWS),
        "--trainer.enable_progress_bar", "false",
        "--output_dir", str(out), *extra,
    ]


from conftest import plain_argv, run_cli  # noqa: E402,F401  (shared in-process CLI runner)


@pytest.fixture
def count_validations(monkeypatch):
    calls = []
    real = commands.evaluate

    def spy(trainer, model, datamodule, zero_shot=None):
        calls.append(1)
        return real(trainer, model, datamodule, zero_shot)

    monkeypatch.setattr(commands, "evaluate", spy)
    return calls


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("short") / "short.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.")
    return p


# --------------------------------------------------------------------------- bad input
BAD = [
    # (id, extra args, substrings the message must contain)
    ("ratio-1", ["--pruning.sparsity_ratio", "1.0"], ["sparsity ratio", "1.0"]),
    ("ratio-neg", ["--pruning.sparsity_ratio", "-0.1"], ["sparsity ratio", "-0.1"]),
    ("type-2:4:1", ["--pruning.sparsity_type", "2:4:1"], ["'2:4:1'"]),
    ("type-4:2", ["--pruning.sparsity_type", "4:2"], ["'4:2'", "N < M"]),
    ("m-not-dividing", ["--pruning.sparsity_type", "5:7"], ["5:7", "M=7", "does not divide", "64"]),
    ("nm-other-ratio", ["--pruning.sparsity_type", "2:4", "--pruning.sparsity_ratio", "0.6"], ["2:4", "0.6"]),
    ("unknown-method", ["--pruning.method", "foo"], ["'foo'", "wanda", "magnitude"]),
    ("unknown-preset", ["--pruning.preset", "best"], ["pruning.preset", "'best'", "quality", "balanced"]),
    ("preset-conflict", ["--pruning.preset", "quality", "--pruning.reconstruct", "attn_mlp"],
     ["pruning.preset quality", "reconstruct='block'", "'attn_mlp'"]),
    ("nsamples-0", ["--data.nsamples", "0"], ["nsamples", ">= 1", "got 0"]),
    ("seqlen-model", ["--data.seqlen", "300"], ["seqlen=300", "256"]),
    ("missing-model", ["--model.name_or_path", "{tmp}/no/such/model"], ["{tmp}/no/such/model", "does not exist"]),
    ("unknown-embedded", ["--model.name_or_path", "no-such-model"], ["'no-such-model'", *EMBEDDED_MODELS]),
    ("missing-text", ["--data.calibration", "{tmp}/nope.txt"], ["{tmp}/nope.txt", "does not exist"]),
    ("missing-eval-text", ["--data.evaluation", "{tmp}/nope-eval.txt"], ["{tmp}/nope-eval.txt", "does not exist"]),
    ("bad-granularity", ["--pruning.granularity", "column"], ["granularity", "'column'"]),
    ("variant-nm", ["--pruning.sparsity_type", "2:4", "--pruning.use_variant", "true"], ["use_variant", "2:4"]),
    ("bias-correction-llama", ["--pruning.bias_correction", "true"], ["bias_correction", "no bias", "LLaMA"]),
    # every regular-expression option is compiled when parsed: one line naming the option and the pattern
    ("regex-targets", ["--model.targets", "[q_proj(]"], ["model.targets", "'q_proj('", "regular expression"]),
    ("regex-ignore", ["--model.ignore", '["*_proj"]'], ["model.ignore", "'*_proj'", "regular expression"]),
    ("regex-trainable", ["--model.trainable", "['a{2,1}']"], ["model.trainable", "'a{2,1}'", "regular expression"]),
    ("regex-lora-targets", ["--model.finetune", "lora", "--model.lora_targets", "[v_proj)]"],
     ["model.lora_targets", "'v_proj)'", "regular expression"]),
    ("regex-profile", ["--pruning.allocation", "profile", "--pruning.profile", '{"mlp.(": 0.5, ".": 0.5}'],
     ["pruning.profile", "'mlp.('", "regular expression"]),
]


@pytest.mark.parametrize("name,extra,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_early_without_output(tiny_dirs, text_file, tmp_path, count_validations, name, extra, expected):
    out = tmp_path / "sub" / "out"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out, *extra))
    assert error is not None, "the run should have failed"
    for text in expected:
        assert text.replace("{tmp}", str(tmp_path)) in error, (text, error)
    assert "Union subtypes" not in error  # the reason itself, not jsonargparse's wrapper around it
    assert count_validations == []  # failed before any validation / pruning
    assert not (tmp_path / "sub").exists()  # no output dir, not even its parent


@pytest.mark.parametrize("which", ["calibration", "evaluation"])
def test_seqlen_longer_than_text(tiny_dirs, text_file, short_text, tmp_path, count_validations, which):
    out = tmp_path / "sub" / "out"
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out, "--data.seqlen", "64", f"--data.{which}", str(short_text)))
    assert error is not None
    assert f"too little {which} text" in error and "seqlen=64" in error, error
    assert count_validations == [] and not (tmp_path / "sub").exists()


def test_not_enough_calibration_windows(tiny_dirs, text_file, short_text, tmp_path, count_validations):
    # longer than one window but too short for nsamples x seqlen
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, tmp_path / "sub" / "out", "--data.seqlen", "16",
                                 "--data.nsamples", "8", "--data.calibration", str(short_text)))
    assert error is not None and "nsamples=8" in error and "seqlen=16" in error, error
    assert count_validations == [] and not (tmp_path / "sub").exists()


def test_output_dir_must_not_hold_the_input(tiny_dirs, text_file, count_validations):
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, tiny_dirs["llama"]))
    assert error is not None and "would overwrite the input" in error
    assert count_validations == []
    assert (tiny_dirs["llama"] / "config.json").is_file()


def test_bad_regex_is_one_line_not_a_traceback(tiny_dirs, text_file, tmp_path):
    """In a process of its own (the other bad values of BAD run in this one, the same command): one
    line on stderr, exit 2, no traceback, nothing created."""
    out = tmp_path / "sub" / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *base_args(tiny_dirs["llama"], text_file, out,
                                                                           "--model.targets", "[q_proj(]")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: model.targets: 'q_proj(' is not a valid regular expression "
                      "(missing ), unterminated subpattern at position 6)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "sub").exists()


def test_classifier_refuses_a_bad_regex_before_building():
    from wanda_pl.errors import UserError
    from wanda_pl.modules.classifier import Classifier

    with pytest.raises(UserError, match=r"model.ignore: '\+head' is not a valid regular expression"):
        Classifier(name="no-such-timm-model", targets=["blocks"], ignore=["+head"])


# --------------------------------------------------------------------------- atomic output
class Boom(RuntimeError):
    pass


def test_error_midway_leaves_no_partial_output(tiny_dirs, text_file, tmp_path, monkeypatch):
    calls = []
    real = commands.evaluate

    def validate_then_fail(trainer, model, datamodule, zero_shot=None):
        calls.append(1)
        if len(calls) == 2:  # after the dense validation, while pruning + validating
            raise Boom("injected failure after dense validation")
        return real(trainer, model, datamodule, zero_shot)

    monkeypatch.setattr(commands, "evaluate", validate_then_fail)
    parent = tmp_path / "runs"
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, parent / "out"))
    assert error is not None and "injected failure" in error
    assert calls == [1, 1]
    assert list(parent.iterdir()) == []  # no out/, no hidden partial folder


def test_failed_rerun_keeps_previous_output(tiny_dirs, text_file, tmp_path, monkeypatch):
    from wanda_pl.modules.causal_lm import CausalLM

    parent = tmp_path / "runs"
    out = parent / "out"
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out))
    assert error is None, error
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "report.json" in before and "calibration_ids.pt" in before

    def save_fails(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "half-written.safetensors").write_bytes(b"x" * 10)
        raise Boom("disk full while saving the model")

    monkeypatch.setattr(CausalLM, "save", save_fails)
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out, "--save_model", "true",
                                 "--pruning.method", "magnitude"))
    assert error is not None and "disk full" in error
    # beside it only the finished blocks' checkpoints, kept for --resume (nothing of the output)
    assert sorted(p.name for p in parent.iterdir()) == [".out.wanda_pl-resume", "out"]
    assert {"fingerprint.json", "progress.rank0.json"} <= {p.name for p in (parent / ".out.wanda_pl-resume").iterdir()}
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # the old run's files, untouched; nothing partial


# --------------------------------------------------------------------------- reproducibility and reload
def block_linears(model):
    from wanda_pl.core.layers import select_targets
    from wanda_pl.families.hf_causal import find_blocks

    prefix, blocks = find_blocks(model)
    out = {}
    for i, b in enumerate(blocks):
        out.update(select_targets(b, f"{prefix}.{i}"))
    return out


def simple_ppl(model, tokenizer, text, seqlen, max_windows):
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = min(ids.numel() // seqlen, max_windows)
    nlls = []
    with torch.no_grad():
        for w in range(n):
            x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
            logits = model(input_ids=x).logits[0]
            nlls.append(F.cross_entropy(logits[:-1].float(), x[0, 1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def load_saved(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("method,sparsity_type", [("wanda", "unstructured"), ("wanda", "2:4")])
def test_replaying_calibration_ids_reproduces_masks(tiny_dirs, text_file, tmp_path, method, sparsity_type):
    common = ["--pruning.method", method, "--pruning.sparsity_type", sparsity_type, "--save_model", "true"]
    out1, out2, out3 = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out1, *common))
    assert error is None, error
    ids1 = torch.load(out1 / "calibration_ids.pt", weights_only=True)
    assert ids1.shape == (NSAMPLES, SEQLEN) and ids1.dtype == torch.long

    # replay with a different seed: the ids file wins, the masks are bit-identical
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out2, *common, "--seed_everything", "7",
                                 "--data.calibration", str(out1 / "calibration_ids.pt")))
    assert error is None, error
    assert torch.equal(torch.load(out2 / "calibration_ids.pt", weights_only=True), ids1)
    r1, r2 = (json.loads((o / "report.json").read_text()) for o in (out1, out2))
    assert r2["seed"] == 7
    assert r1["metrics"] == r2["metrics"]
    assert r1["layers"] == r2["layers"]
    m1, _ = load_saved(out1 / "model")
    m2, _ = load_saved(out2 / "model")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k

    # without the ids file, seed 7 draws other windows and gives other masks (so the replay mattered)
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out3, *common, "--seed_everything", "7"))
    assert error is None, error
    ids3 = torch.load(out3 / "calibration_ids.pt", weights_only=True)
    assert not torch.equal(ids3, ids1)
    m3, _ = load_saved(out3 / "model")
    s3 = m3.state_dict()
    assert any(not torch.equal(s1[k] == 0, s3[k] == 0) for k in s1)


@pytest.mark.parametrize("family,method,sparsity_type", [("llama", "wanda", "unstructured"), ("gpt2", "wanda", "2:4"),
                                                         ("opt", "magnitude", "unstructured")])
def test_saved_model_reloads_with_same_sparsity_and_ppl(tiny_dirs, text_file, tmp_path, family, method, sparsity_type):
    out = tmp_path / "out"
    error, _ = run_cli(base_args(tiny_dirs[family], text_file, out, "--pruning.method", method,
                                 "--pruning.sparsity_type", sparsity_type, "--save_model", "true"))
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    model, tok = load_saved(out / "model")
    layers = block_linears(model)
    assert sorted(layers) == sorted(report["layers"])
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    assert zeros / total == pytest.approx(report["actual_sparsity"], abs=1e-9)
    assert abs(zeros / total - 0.5) < 1e-6
    for name, m in layers.items():
        assert float((m.weight == 0).float().mean()) == pytest.approx(report["layers"][name], abs=1e-9)
    # outside the decoder blocks nothing was pruned: embeddings and head equal the dense folder's
    dense, _ = load_saved(tiny_dirs[family])
    ds, ps = dense.state_dict(), model.state_dict()
    in_blocks = {f"{n}.weight" for n in layers}
    changed = [k for k in ds if not torch.equal(ds[k], ps[k])]
    assert changed and set(changed) <= in_blocks
    # the report's perplexities, recomputed with a plain loop
    ppl = simple_ppl(model, tok, text_file.read_text(), SEQLEN, WINDOWS)
    assert ppl == pytest.approx(report["metrics"]["ppl"]["pruned"], rel=1e-5)
    ppl_dense = simple_ppl(dense, tok, text_file.read_text(), SEQLEN, WINDOWS)
    assert ppl_dense == pytest.approx(report["metrics"]["ppl"]["dense"], rel=1e-5)


# --------------------------------------------------------------------------- recipes
def _leaves(d, path=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, path + (k,))
    else:
        yield path, d


def _get(d, path):
    for k in path:
        d = d[k]
    return d


def print_config(args):
    out = io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), plain_argv(), \
            pytest.raises(SystemExit) as exit_info:
        main(args=list(args) + ["--print_config"])
    assert exit_info.value.code in (0, None), err.getvalue()
    return yaml.safe_load(out.getvalue())


def recipe_command(recipe: Path) -> str:
    """The subcommand a recipe is for, read from its own usage comment
    ``# python cli.py <command> --config configs/<recipe>`` (a recipe may show other commands too)."""
    rel = recipe.relative_to(ROOT).as_posix()
    found = set(re.findall(rf"^#.*python cli\.py (\w+) --config {re.escape(rel)}(?!\S)", recipe.read_text(), re.M))
    assert len(found) == 1, f"{rel} must say how it is run: '#   python cli.py <command> --config {rel}'"
    return found.pop()


def test_a_named_subcommand_builds_its_parser_alone_and_help_lists_them_all(monkeypatch):
    """Building every subcommand's parser is most of a small run's start-up: a command line that names one
    builds that one; without a subcommand (``--help``, a typo) all are built, so help and errors list them."""
    import cli

    built = []
    real = cli.WandaCLI._prepare_subcommand_parser
    monkeypatch.setattr(cli.WandaCLI, "_prepare_subcommand_parser",
                        lambda self, klass, sub, **kw: built.append(sub) or real(self, klass, sub, **kw))
    error, shown = run_cli(["prune", "--help"])
    assert error is None and "--pruning.sparsity_ratio" in shown
    assert built == ["prune"]
    built.clear()
    error, shown = run_cli(["--help"])
    assert error is None and built == list(cli.WandaCLI.subcommands())
    assert all(name in shown for name in ("fit", "prune", "sweep", "validate"))
    error, _ = run_cli(["prnue"])
    assert error.startswith("exit 2") and "'prnue'" in error and "'prune'" in error, error


def test_every_recipe_parses():
    recipes = sorted((ROOT / "configs").glob("**/*.yaml"))
    command_of = {}
    for recipe in recipes:
        source = yaml.safe_load(recipe.read_text())
        command_of[recipe.name] = recipe_command(recipe)
        printed = print_config([command_of[recipe.name], "--config", str(recipe)])
        for path, value in _leaves(source):
            assert _get(printed, path) == value, (recipe.name, path)
    assert {"prune", "sweep", "fit"} <= set(command_of.values()), command_of  # the fine-tuning recipes as fit
    print(f"{len(recipes)} recipes parsed: {command_of}")


# --------------------------------------------------------------------------- the command table
def toy_args(tiny_dirs, text_file, out, *extra):
    return ["toy", *base_args(tiny_dirs["llama"], text_file, out, *extra)[1:]]


def test_one_table_entry_makes_a_command_with_its_output_check_and_config(tiny_dirs, text_file, tmp_path, monkeypatch):
    import cli

    calls = []

    def toy(self, model, datamodule, output_dir: str = "outputs/toy", run_config=None):
        """A command added by one table entry."""
        calls.append((output_dir, run_config, hasattr(self, "run_config")))

    monkeypatch.setattr(cli.WandaTrainer, "toy", toy, raising=False)
    monkeypatch.setitem(cli.COMMANDS, "toy", cli.Command(reports=True))
    monkeypatch.setitem(cli.COMMANDS, "hello", cli.Command(standalone=lambda argv: print("hello", *argv)))
    assert cli.WandaCLI.subcommands()["toy"] == {"model", "datamodule", "run_config"}
    assert "hello" not in cli.WandaCLI.subcommands()
    assert run_cli(["hello", "world"]) == (None, "hello world\n")  # before LightningCLI: no model, no options
    # its output folder is checked as prune's is, before any work
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    error, _ = run_cli(toy_args(tiny_dirs, text_file, foreign))
    assert error is not None and "holds files this program did not write" in error and calls == [], error
    # the run's config reaches the method as an argument, never as an option or a trainer attribute
    error, _ = run_cli(toy_args(tiny_dirs, text_file, tmp_path / "out", "--run_config", "{}"))
    assert error is not None and "unrecognized arguments: --run_config" in error and calls == [], error
    error, _ = run_cli(toy_args(tiny_dirs, text_file, tmp_path / "out"))
    assert error is None, error
    [(output_dir, config, attribute)] = calls
    assert output_dir == config["output_dir"] == str(tmp_path / "out") and not attribute
    assert config["model"]["init_args"]["name_or_path"] == str(tiny_dirs["llama"])


def test_prune_gets_the_run_config_as_an_argument(tiny_dirs, text_file, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(commands, "prune", lambda trainer, *a, **k: seen.append((trainer, k.get("config"))) or {})
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, tmp_path / "out", "--pruning.sparsity_type", "2:4"))
    assert error is None, error
    [(trainer, config)] = seen
    assert not hasattr(trainer, "run_config")
    assert config["pruning"]["sparsity_type"] == "2:4" and config["data"]["init_args"]["seqlen"] == SEQLEN
    assert config["output_dir"] == str(tmp_path / "out") and json.loads(json.dumps(config)) == config
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, tmp_path / "out", "--run_config", "{}"))
    assert error is not None and "unrecognized arguments: --run_config" in error, error


def test_printed_config_round_trips(tiny_dirs, text_file, tmp_path):
    args = base_args(tiny_dirs["llama"], text_file, tmp_path / "out", "--pruning.sparsity_type", "2:4")
    printed = print_config(args)
    assert printed["pruning"]["sparsity_type"] == "2:4"
    assert printed["data"]["init_args"]["nsamples"] == NSAMPLES
    assert printed["model"]["init_args"]["name_or_path"] == str(tiny_dirs["llama"])
    saved = tmp_path / "recipe.yaml"
    saved.write_text(yaml.safe_dump(printed))
    again = print_config(["prune", "--config", str(saved)])
    assert again == printed
    # and the recipe runs
    error, _ = run_cli(["prune", "--config", str(saved)])
    assert error is None, error
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sparsity_type"] == "2:4" and report["actual_sparsity"] == 0.5
    assert report["config"]["data"]["init_args"]["seqlen"] == SEQLEN
