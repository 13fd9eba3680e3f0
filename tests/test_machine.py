"""Every report records the hardware and math settings that decide its numbers (commands/machine.py),
checked against what this machine is, read another way than the code reads it."""
import json
import os
import subprocess

import pytest
import torch

from conftest import run_cli
from test_sweep import args
from wanda_pl.commands.card import model_card
from wanda_pl.commands.machine import one_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cpu_name_from_lscpu():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def test_report_and_card_hold_the_hardware_of_this_machine(tiny_dirs, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # a reproducibility switch in force is recorded
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    out = tmp_path / "run"
    err, _ = run_cli(args("prune", tiny_dirs["llama"], text_file, out, "--save_model", "true"))
    assert err is None, err
    report = json.loads((out / "report.json").read_text())
    hw = report["hardware"]
    assert "hardware" in report["sections"]["environment"]
    assert hw["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert hw["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "NO AVX", "ZVECTOR", "SVE256", "VSX")
    lscpu = cpu_name_from_lscpu()
    if lscpu is not None:  # lscpu is util-linux's; where it is missing the next line still holds
        assert hw["cpu"] == lscpu
    assert hw["cpu"]
    assert hw["blas"] == ("MKL" if torch.backends.mkl.is_available() else hw["blas"])
    if hw["blas"] == "MKL":
        assert hw["blas_version"] and hw["blas_version"][0].isdigit()
        assert f"Math Kernel Library Version {hw['blas_version']}" in torch.__config__.show()
    assert hw["torch_threads"] == 1 == report["torch_threads"]  # the module's one thread, as the run had it
    assert hw["switches"]["MKL_CBWR"] == "AUTO"
    assert all(os.environ.get(k) == v for k, v in hw["switches"].items())
    if "OMP_NUM_THREADS" in os.environ:  # as CI and the tests' subprocesses set it
        assert hw["switches"]["OMP_NUM_THREADS"] == os.environ["OMP_NUM_THREADS"]
    assert hw["gpu"] is None  # the CPU run used no CUDA device
    assert hw["deterministic_algorithms"] is False and hw["float32_matmul_precision"] == "highest"
    card = (out / "model" / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("| hardware |"))
    assert line == f"| hardware | {one_line(hw)} |"
    assert f"({hw['cpu_capability']})" in line and "1 torch threads" in line and "MKL_CBWR=AUTO" in line


def test_the_cards_line_names_a_gpu_and_its_settings():
    hw = {"cpu": "Some CPU", "cpu_capability": "AVX512", "blas": "MKL", "blas_version": "2024.2", "torch_threads": 8,
          "switches": {}, "deterministic_algorithms": True,
          "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0", "cuda": "13.0", "cudnn": 92400,
                  "tf32_matmul": False}}
    assert one_line(hw) == ("Some CPU (AVX512); MKL 2024.2; 8 torch threads; NVIDIA H100 (sm 9.0, CUDA 13.0, "
                            "cuDNN 92400, TF32 off); deterministic algorithms")
    assert "| hardware | not recorded |" in model_card({"model": "m", "method": "wanda"}, "/x")
