"""Profiles: names, overrides, hardware-dependent dtypes and the errors a learner sees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from course_utils.course import profiles


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(profiles.ENV_VAR, raising=False)


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    return install


def test_tiny_is_cpu_fp32_on_the_shipped_model():
    profile = profiles.get_profile("tiny", verbose=False)
    assert (profile.name, profile.device, profile.compute_dtype) == ("tiny", "cpu", torch.float32)
    assert (Path(profile.model_name_or_path) / "model.safetensors").exists()
    assert profile.data_source == "world"
    assert not profile.fp16 and not profile.bf16 and profile.use_cpu


def test_auto_without_gpu_picks_tiny_and_prints_one_banner(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profile = profiles.get_profile("auto")
    banner = capsys.readouterr().out
    assert profile.name == "tiny"
    assert banner.count("\n") == 1
    assert "no CUDA GPU" in banner and "COURSE_PROFILE" in banner and "PROFILE = " in banner


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid profiles: tiny, colab, rehearsal, auto"):
        profiles.get_profile("large")


def test_environment_overrides_the_notebook(monkeypatch):
    monkeypatch.setenv(profiles.ENV_VAR, "tiny")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert profiles.get_profile("colab", verbose=False).name == "tiny"


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(profiles.ENV_VAR, "huge")
    with pytest.raises(ValueError, match="COURSE_PROFILE='huge'"):
        profiles.get_profile("auto")


def test_colab_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(profiles.ProfileError, match="needs a CUDA GPU.*T4 GPU.*'tiny'"):
        profiles.get_profile("colab")


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16),  # T4 (Turing)
                                               ((8, 0), torch.bfloat16),  # A100
                                               ((9, 0), torch.bfloat16)])  # H100
def test_colab_dtype_follows_the_gpu(fake_gpu, capability, dtype):
    fake_gpu(capability)
    profile = profiles.get_profile("colab", verbose=False)
    assert profile.compute_dtype == dtype
    assert profile.fp16 == (dtype == torch.float16) and profile.bf16 == (dtype == torch.bfloat16)
    assert profile.model_name_or_path == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
    assert profile.load_in_4bit and profile.device == "cuda" and profile.data_source == "hub"


def test_auto_with_gpu_picks_colab(fake_gpu, capsys):
    fake_gpu((7, 5))
    assert profiles.get_profile("auto").name == "colab"
    assert "Fake GPU" in capsys.readouterr().out


def test_profiles_are_frozen():
    profile = profiles.get_profile("tiny", verbose=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.device = "cuda"
