"""The hardware and math settings that decide a run's numbers, recorded in every report.

Floating-point sums are not associative, and the order a CPU kernel adds in depends on the
instruction set it was dispatched for (torch's CPU capability: AVX-512, AVX2, default), on the
BLAS library and its own code path (MKL picks one per CPU unless ``MKL_CBWR`` pins it), and on how
many threads split the work. One changed last bit can flip a near-tie in a mask and propagate to
every later block, so two reports that differ only in these fields explain why their numbers do."""
from __future__ import annotations

import os
import platform
import re
from typing import Any, Dict, Optional

import torch

# Environment variables that change which kernels run or how they round; recorded when set.
SWITCHES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
            "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS",
            "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s first ``model name``), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas() -> Dict[str, Optional[str]]:
    """The BLAS torch was built with and, where its build says, the version."""
    shown = torch.__config__.show()
    info = re.search(r"BLAS_INFO=([^,\s]+)", shown)
    name = info.group(1) if info else None
    version = re.search(r"Math Kernel Library Version ([0-9][0-9.]*)", shown) if name == "mkl" else None
    onednn = re.search(r"(?:MKL-DNN|oneDNN)\s+v([^\s(]+)", shown)
    return {"blas": "MKL" if name == "mkl" else ("OpenBLAS" if name == "open" else name),
            "blas_version": version.group(1) if version else None,
            "onednn_version": onednn.group(1) if onednn else None}


def gpu() -> Optional[Dict[str, Any]]:
    """The CUDA device this process used, with the settings that change its rounding; None on CPU."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "count": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32, "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def hardware() -> Dict[str, Any]:
    """The report's ``hardware`` entry."""
    return {"cpu": cpu_model(), "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **blas(), "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "switches": {k: os.environ[k] for k in SWITCHES if k in os.environ}, "gpu": gpu()}


def one_line(hw: Optional[Dict[str, Any]]) -> str:
    """``hardware`` in one line, for model cards and logs."""
    if not hw:
        return "not recorded"
    parts = [f"{hw.get('cpu')} ({hw.get('cpu_capability')})",
             f"{hw.get('blas')} {hw.get('blas_version') or ''}".strip(), f"{hw.get('torch_threads')} torch threads"]
    if hw.get("gpu"):
        g = hw["gpu"]
        parts.append(f"{g['name']} (sm {g['compute_capability']}, CUDA {g['cuda']}, cuDNN {g['cudnn']}, "
                     f"TF32 {'on' if g['tf32_matmul'] else 'off'})")
    if hw.get("switches"):
        parts.append(" ".join(f"{k}={v}" for k, v in hw["switches"].items()))
    if hw.get("deterministic_algorithms"):
        parts.append("deterministic algorithms")
    return "; ".join(parts)
