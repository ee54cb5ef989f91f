"""scripts/device_check.py: says plainly when there is no GPU, and its checks run (on the CPU, tiny model)."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import device_check


def test_without_cuda_it_says_it_needs_one(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert device_check.main([]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["cuda"] is False and "needs a CUDA GPU" in out["error"]


def test_a_cpu_dry_run_reports_every_number(capsys):
    assert device_check.main(["--device", "cpu", "--models", "tiny:llama_gqa", "--steps", "4", "--repeats", "2"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["transfers_per_step"] == 1  # a step's records move to the host in one go
    assert result["parity_max_abs_logit_diff"] < 1e-4 and result["dtype"] == "float32"
    assert result["play_frames_per_s"] > 0 and result["capture_overhead"] > 0 and result["steps"] == 3
