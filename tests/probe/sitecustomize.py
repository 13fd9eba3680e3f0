"""Loaded by every Python process started with this folder on PYTHONPATH (DDP ranks too): test probes.

WANDA_PL_PROBE_DIR: each rank writes how many calibration samples entered the engine's first block
(counted on the inputs the engine gets, not taken from any report). WANDA_PL_PROBE_KILL_AFTER=k:
the process kills itself with SIGKILL right after block k's checkpoint is written."""
import os

if os.environ.get("WANDA_PL_PROBE_DIR") or os.environ.get("WANDA_PL_PROBE_KILL_AFTER"):
    import json
    import signal
    from pathlib import Path

    import wanda_pl.core.engine as engine
    from wanda_pl.commands import resume

    def _rank():
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    real_block = engine._calibrate_and_prune
    seen = {"first": True}

    def counting(block, targets, inputs, *args, **kwargs):
        if seen["first"] and os.environ.get("WANDA_PL_PROBE_DIR"):
            seen["first"] = False
            n = sum(int(inp.hidden.shape[0]) for inp in inputs)
            out = Path(os.environ["WANDA_PL_PROBE_DIR"]) / f"rank{_rank()}.json"
            out.write_text(json.dumps({"samples": n, "batches": len(inputs)}))
        return real_block(block, targets, inputs, *args, **kwargs)

    engine._calibrate_and_prune = counting

    real_save = resume.BlockCheckpoints.save

    def save_then_die(self, index, *args, **kwargs):
        real_save(self, index, *args, **kwargs)
        if os.environ.get("WANDA_PL_PROBE_KILL_AFTER") == str(index):
            os.kill(os.getpid(), signal.SIGKILL)

    resume.BlockCheckpoints.save = save_then_die
