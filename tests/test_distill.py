"""Distillation while fine-tuning: the losses against slow hand-written definitions, the teacher frozen
and untouched, the masks kept, the top-k cache, the refusals, a resumed fit, the fit command."""
import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import make_tokenizer, run_cli, tiny_model  # noqa: E402
from wanda_pl.callbacks import Calibration, Distillation, Pruning  # noqa: E402
from wanda_pl.data.text_module import TextDataModule  # noqa: E402
from wanda_pl.eval.perplexity import window_nll  # noqa: E402
from wanda_pl.modules.causal_lm import CausalLM  # noqa: E402
from wanda_pl.training.distill import feature_loss, kl, kl_top_k  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the losses, slowly
def slow_kl(student, teacher, t):
    """sum_v p_v (log p_v - log q_v) per token, p the teacher's softmax at t, q the student's; mean; x t^2."""
    total, n = 0.0, 0
    for s_row, t_row in zip(student.reshape(-1, student.shape[-1]).double(), teacher.reshape(-1, teacher.shape[-1]).double()):
        p = [math.exp(x) for x in (t_row / t).tolist()]
        q = [math.exp(x) for x in (s_row / t).tolist()]
        zp, zq = sum(p), sum(q)
        total += sum(pv / zp * (math.log(pv / zp) - math.log(qv / zq)) for pv, qv in zip(p, q))
        n += 1
    return total / n * t * t


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_kl_equals_the_definition(t):
    g = torch.Generator().manual_seed(0)
    s, te = torch.randn(2, 3, 11, generator=g) * 3, torch.randn(2, 3, 11, generator=g) * 3
    assert float(kl(s, te, t)) == pytest.approx(slow_kl(s, te, t), rel=1e-5)
    assert float(kl(te, te, t)) == pytest.approx(0.0, abs=1e-6)


def test_top_k_kl_is_the_kl_against_the_truncated_teacher_and_the_kl_at_full_k():
    g = torch.Generator().manual_seed(1)
    s, te = torch.randn(2, 4, 13, generator=g), torch.randn(2, 4, 13, generator=g) * 2
    full = te.topk(13, dim=-1)
    assert float(kl_top_k(s, full.values, full.indices, 1.5)) == pytest.approx(float(kl(s, te, 1.5)), rel=1e-5)
    top = te.topk(5, dim=-1)
    # slowly: the teacher's probabilities over its 5 largest logits only, renormalised; 0 elsewhere
    total = 0.0
    for b in range(2):
        for i in range(4):
            p = torch.softmax(top.values[b, i].double() / 1.5, -1)
            logq = torch.log_softmax(s[b, i].double() / 1.5, -1)[top.indices[b, i]]
            total += float((p * (p.log() - logq)).sum())
    assert float(kl_top_k(s, top.values, top.indices, 1.5)) == pytest.approx(total / 8 * 1.5 ** 2, rel=1e-5)


def test_feature_loss_is_the_mse_over_the_teacher_variance():
    g = torch.Generator().manual_seed(2)
    s, te = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g) * 3 + 1
    xs, xt = s.flatten().tolist(), te.flatten().tolist()
    mse = sum((a - b) ** 2 for a, b in zip(xs, xt)) / len(xs)
    mean = sum(xt) / len(xt)
    var = sum((b - mean) ** 2 for b in xt) / len(xt)
    assert float(feature_loss(s, te)) == pytest.approx(mse / var, rel=1e-5)


# --------------------------------------------------------------------------- one step on a tiny model
class _Trainer:
    world_size = 1


def _module(folder):
    module = CausalLM(str(folder))
    module.log = lambda *a, **k: None  # outside a Trainer
    module.__dict__["_trainer"] = None
    return module


def test_squarehead_step_equals_a_hand_computation(tiny_dirs, monkeypatch):
    """The step's loss = (1 - w) nll + w (KL + mean over blocks of MSE / Var), the block outputs read
    independently here: HF's hidden states, the last one as the final norm's input."""
    student = _module(tiny_dirs["llama"])
    distill = Distillation("dense", "squarehead", weight=0.3, temperature=2.0)
    distill.prepare(student, None)
    with torch.no_grad():  # the student drifts from the teacher
        for p in student.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    monkeypatch.setattr(CausalLM, "trainer", property(lambda self: _Trainer()))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = distill.step(student, ids)

    def hidden(model):
        seen = []
        h = model.model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        h.remove()
        return out.logits, list(out.hidden_states[1:-1]) + seen

    reference = tiny_model("llama")  # the dense weights the folder holds
    (s_logits, s_hidden), (t_logits, t_hidden) = hidden(student.model), hidden(reference)
    nll = float(window_nll(s_logits, ids).mean())
    feats = [float(feature_loss(a, b)) for a, b in zip(s_hidden, t_hidden)]
    want = 0.7 * nll + 0.3 * (slow_kl(s_logits, t_logits, 2.0) + sum(feats) / len(feats))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert distill.history["feature_per_block"][0] == pytest.approx(feats, rel=1e-5)


# --------------------------------------------------------------------------- fitting
def _trainer(callbacks, max_steps, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=callbacks, **kw)


def _dm(text_file):
    return TextDataModule(str(text_file), str(text_file), nsamples=8, seqlen=32, max_eval_windows=2, batch_size=2)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_the_teacher_is_the_dense_model_frozen_and_the_masks_are_kept(tiny_dirs, text_file, finetune):
    module = CausalLM(str(tiny_dirs["llama"]), learning_rate=1e-2, finetune=finetune,
                      lora_targets=["q_proj", "v_proj", "up_proj"])
    dense = {k: v.clone() for k, v in module.model.state_dict().items()}
    pruning = Pruning("wanda", sparsity_ratio=0.5, enabled=True)
    distill = Distillation("dense", "squarehead", weight=0.5)
    _trainer([Calibration(), pruning, distill], 4).fit(module, datamodule=_dm(text_file))
    teacher = distill.teacher.model
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert not teacher.training and "teacher" not in dict(module.named_children())
    got = teacher.state_dict()
    assert set(got) == set(dense) and all(torch.equal(got[k], dense[k]) for k in dense)  # never pruned, never trained
    for name, mask in pruning.masks.items():  # the student's pruned weights are still exactly zero
        w = module.model.get_submodule(name)
        w = getattr(w, "base_layer", w).weight
        assert bool((w[mask] == 0).all()), name
    assert pruning.start_sparsity == 0.5
    assert len(distill.history["kl"]) == 4 and distill.tokens_seen == 4 * 2 * 32
    assert not any(k.startswith("teacher") for k in module.state_dict())  # never in the checkpoint


def test_the_cache_at_full_k_gives_the_live_teacher_s_loss(tiny_dirs, text_file, tmp_path):
    dm = _dm(text_file)
    live, cached = (Distillation("dense", "kl", weight=1.0, temperature=2.0, **kw)
                    for kw in ({}, {"cache": str(tmp_path / "cache"), "top_k": 256}))
    modules = []
    for d in (live, cached):
        module = CausalLM(str(tiny_dirs["llama"]))
        dm.prepare_for(module)
        d.prepare(module, dm)
        modules.append(module)
    assert cached.teacher is None and (tmp_path / "cache" / "top_k.pt").is_file()  # no teacher in memory
    ids = dm.train_ids()[:2]
    with torch.no_grad():
        for m in modules:
            for p in m.model.parameters():
                p.mul_(0.9)  # the student moved away from its teacher
    losses = []
    for d, m in zip((live, cached), modules):
        m.log = lambda *a, **k: None
        m.__dict__["_trainer"] = type("T", (), {"world_size": 1})()
        losses.append(float(d.step(m, ids)))
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)  # fp16 logits in the cache
    # reused while teacher, windows and k agree; refused by name when they do not
    again = Distillation("dense", "kl", cache=str(tmp_path / "cache"), top_k=256)
    again.prepare(modules[0], dm)
    assert again.cache is not None and again.cache.meta == cached.cache.meta
    with pytest.raises(Exception, match="built for other settings: k 256"):
        Distillation("dense", "kl", cache=str(tmp_path / "cache"), top_k=8).prepare(CausalLM(str(tiny_dirs["llama"])), dm)


def test_a_resumed_fit_continues_with_the_same_teacher(tiny_dirs, text_file, tmp_path):
    module = CausalLM(str(tiny_dirs["llama"]), learning_rate=1e-2)
    distill = Distillation("dense", "kl")
    t = _trainer([Calibration(), Pruning("wanda", sparsity_ratio=0.5, enabled=True), distill], 3)
    t.fit(module, datamodule=_dm(text_file))
    t.save_checkpoint(tmp_path / "step3.ckpt")
    trained = {k: v.clone() for k, v in module.model.state_dict().items()}

    fresh = CausalLM(str(tiny_dirs["llama"]), learning_rate=1e-2)  # the dense model, as a user resumes
    dense = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    again = Distillation("dense", "kl")
    t2 = _trainer([Calibration(), Pruning("wanda", sparsity_ratio=0.5, enabled=False), again], 5)
    t2.fit(fresh, datamodule=_dm(text_file), ckpt_path=str(tmp_path / "step3.ckpt"))
    assert t2.global_step == 5
    got = again.teacher.model.state_dict()
    assert all(torch.equal(got[k], dense[k]) for k in dense)  # the dense teacher, not the checkpoint's student
    assert any(not torch.equal(trained[k], dense[k]) for k in dense)
    assert again.tokens_seen == 5 * 2 * 32 and len(again.history["kl"]) == 5  # counted on from the checkpoint


# --------------------------------------------------------------------------- the fit command
def _fit_args(model_dir, text_file, out, *extra):
    return ["fit", "--model.name_or_path", str(model_dir), "--data.calibration", str(text_file),
            "--data.evaluation", str(text_file), "--data.nsamples", "4", "--data.seqlen", "32",
            "--data.max_eval_windows", "2", "--pruning.enabled", "true", "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--output_dir", str(out), *extra]


def test_fit_distils_and_reports_every_loss(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "out"
    error, _ = run_cli(_fit_args(tiny_dirs["llama"], text_file, out, "--distill.teacher", "dense",
                                 "--distill.loss", "squarehead", "--distill.weight", "0.25"))
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    d = report["distill"]
    assert (d["teacher"], d["loss"], d["weight"], d["tokens_seen"]) == ("dense", "squarehead", 0.25, 2 * 32)
    assert set(d["losses"]) == {"next_token", "kl", "feature", "distill", "feature_per_block"}
    assert len(d["losses"]["feature_per_block"]["first"]) == 2
    assert report["sparsity_before"] == report["sparsity_after"] == 0.5


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory):
    """A 3-block teacher (same tokenizer) and one with a larger vocabulary."""
    import transformers as tf

    from conftest import tiny_config

    out = {}
    for name, cfg in (("deeper", dict(num_hidden_layers=3)), ("vocab", dict(vocab_size=300))):
        config = tiny_config("llama")
        for k, v in cfg.items():
            setattr(config, k, v)
        d = tmp_path_factory.mktemp(name)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(d)
        make_tokenizer().save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("extra,message", [
    (("--distill.teacher", "dense", "--distill.weight", "1.5"), "distill.weight must be in [0, 1], got 1.5"),
    (("--distill.teacher", "dense", "--distill.temperature", "0"), "distill.temperature must be > 0, got 0"),
    (("--distill.teacher", "dense", "--model.offload", "cpu"), "model.offload=cpu holds one block at a time"),
    (("--distill.teacher", "deeper", "--distill.loss", "squarehead"), "the teacher has 3 blocks of width 64"),
    (("--distill.teacher", "vocab"), "another vocabulary or tokenizer"),
    (("--distill.teacher", "dense", "--distill.loss", "squarehead", "--distill.cache", "c"), "keeps the teacher's logits"),
])
def test_bad_distillation_input_is_refused_before_any_work(tiny_dirs, text_file, tmp_path, other_teachers, extra,
                                                             message):
    extra = [str(other_teachers.get(x, x)) for x in extra]
    out = tmp_path / "out"
    error, _ = run_cli(_fit_args(tiny_dirs["llama"], text_file, out, *extra))
    assert error is not None and message in error, error
    assert not out.exists()


def test_training_text_from_another_source_never_the_evaluation_file(tiny_dirs, text_file, tmp_path):
    other = tmp_path / "train.txt"
    other.write_text(" ".join(f"word{i}" for i in range(3000)))
    dm = TextDataModule(str(text_file), str(text_file), nsamples=4, seqlen=32, train=str(other))
    dm.prepare_for(CausalLM(str(tiny_dirs["llama"])))
    assert not torch.equal(dm.train_ids(), dm.calibration_ids())
    assert dm.describe()["train"] == str(other)
    with pytest.raises(ValueError, match="is the evaluation file"):
        TextDataModule(str(text_file), str(text_file), train=str(text_file))


@pytest.mark.slow
def test_two_data_parallel_processes_give_the_one_process_loss_curve(tiny_dirs, text_file, tmp_path):
    """4 windows a step either way: one process with batches of 4, or 2 gloo ranks with 2 each (the
    gradients are averaged over ranks, the recorded losses too): the same curve, up to float rounding."""
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    reports = {}
    for devices, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"d{devices}"
        args = _fit_args(tiny_dirs["llama"], text_file, out, "--distill.teacher", "dense", "--distill.loss",
                         "squarehead", "--trainer.max_steps", "3", "--data.batch_size", str(batch),
                         "--model.learning_rate", "0.01", "--trainer.accelerator", "cpu",
                         "--trainer.devices", str(devices), *(["--trainer.strategy", "ddp"] if devices > 1 else []))
        if devices == 1:  # in this process: a process start costs more than the tiny run
            from conftest import run_cli

            error, _ = run_cli(args)
            assert error is None, error
        else:
            proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=900)
            assert proc.returncode == 0, proc.stderr[-4000:]
        reports[devices] = json.loads((out / "report.json").read_text())
    one, two = (reports[d]["distill"]["losses"] for d in (1, 2))
    assert reports[2]["devices"] == 2 and reports[1]["distill"]["tokens_seen"] == reports[2]["distill"]["tokens_seen"]
    for name in ("next_token", "kl", "feature", "distill"):
        for end in ("first", "last"):
            assert two[name][end] == pytest.approx(one[name][end], rel=1e-4), (name, end)
    assert one["kl"]["last"] != one["kl"]["first"]  # it trained


def test_a_bfloat16_teacher_serves_a_float32_student(tiny_dirs, monkeypatch):
    student = _module(tiny_dirs["llama"])
    distill = Distillation("dense", "kl", teacher_dtype="bfloat16")
    distill.prepare(student, None)
    assert distill.teacher.dtype == torch.bfloat16 and next(student.model.parameters()).dtype == torch.float32
    monkeypatch.setattr(CausalLM, "trainer", property(lambda self: _Trainer()))
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    loss = distill.step(student, ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert distill.describe()["teacher_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="distill.teacher_dtype must be one of"):
        Distillation("dense", teacher_dtype="int8")
