"""``scripts/sft.py --fsdp``: FSDP2 on two CPU processes (gloo), checked against a DDP run.

Both runs train the tiny SFT recipe on the unquantized course model (``quantization=null``): under
4-bit weights trl keeps the adapters in bf16, too coarse for the comparison below (the script's
docstring says what was checked by hand there). ``warmup_steps=0`` so that every one of the three
steps moves the adapter.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from course_utils.course.paths import REPO_ROOT

SHARED_RUN = ["--profile", "tiny", "--set", "training.max_steps=3", "--set",
              "training.warmup_steps=0", "--set", "quantization=null", "--train-rows", "96"]
# Same recipe, seed, data and steps: the runs differ only in the order of float32 sums (a
# reduce-scatter and a per-shard gradient norm against an all-reduce and a whole one). AdamW passes
# that on to a handful of weights whose gradient is near its eps, by up to a few 1e-6 each: per
# tensor, |fsdp - ddp| / |ddp| up to 4e-6 was observed. A shard trained on unaveraged or stale
# gradients, or put back in the wrong place, is off by about a learning rate (1e-3) on most of its
# weights: 1e-2 of a tensor or more. The tolerance sits between the two.
ADAPTER_TOLERANCE = 1e-4


def train_on_two_processes(output_dir, port: int, *extra: str) -> list[dict]:
    env = {**os.environ, "COURSE_PROFILE": "tiny", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(port), str(REPO_ROOT / "scripts" / "sft.py"),
               "--output-dir", str(output_dir), *SHARED_RUN, *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_fsdp_shards_every_parameter_and_trains_the_adapter_ddp_trains(tmp_path):
    fsdp = train_on_two_processes(tmp_path / "fsdp", 29532, "--fsdp")
    ddp = train_on_two_processes(tmp_path / "ddp", 29533)
    assert [r["fsdp"] for r in fsdp + ddp] == [True, True, False, False]
    assert [r["steps"] for r in fsdp + ddp] == [3] * 4

    shards = [r["parameter_shards"] for r in fsdp]
    assert shards[0].keys() == shards[1].keys()
    assert sum("lora_" in name for name in shards[0]) == 6 * 7 * 2  # the adapters are sharded too
    for name, (full, local) in shards[0].items():
        other_full, other_local = shards[1][name]
        assert full == other_full
        # FSDP2 cuts along the first dimension, as torch.chunk does: each rank half of it
        assert local[0] == math.ceil(full[0] / 2) and other_local[0] == full[0] - local[0], name
        assert local[1:] == other_local[1:] == full[1:], name

    # the same rows reached the same rank in both runs
    for sharded, replicated in zip(fsdp, ddp):
        assert sharded["example_fingerprints"] == replicated["example_fingerprints"]
    sharded_adapter = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    ddp_adapter = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert sharded_adapter.keys() == ddp_adapter.keys()
    for name, expected in ddp_adapter.items():
        assert expected.dtype == torch.float32
        assert sharded_adapter[name].shape == expected.shape, name
        relative = ((sharded_adapter[name] - expected).norm() / expected.norm()).item()
        assert relative <= ADAPTER_TOLERANCE, f"{name}: {relative:.2e}"
    # lora_B starts at zero, so its size is how far training moved it: AdamW moves a weight by
    # about a learning rate (3e-3 at the first step) each step
    assert max(t.abs().max().item() for name, t in ddp_adapter.items() if "lora_B" in name) > 1e-3
