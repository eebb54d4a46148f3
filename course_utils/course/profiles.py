"""Profiles: one notebook, two scales.

Every notebook's ``parameters`` cell holds ``PROFILE = "auto"`` and calls ``get_profile(PROFILE)``
once. The returned ``Profile`` says which model to load, where, in which dtype and on which data;
how each stage trains (steps, batch sizes, learning rates, ...) is its recipe,
``configs/recipes/<profile>/<stage>.yaml`` (``course_utils.course.recipes``).

- ``tiny``: the course model from ``data/course-model/`` and the synthetic world, on the CPU in
  fp32. Offline. What CI runs, and what ``auto`` picks without a GPU.
- ``colab``: ``TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T`` from the Hub, UltraChat and
  Orca DPO pairs, 4-bit NF4 weights with fp16 compute on a T4 (bf16 on GPUs that support it),
  sized for a 15 GB T4. Needs CUDA and the network.
- ``rehearsal``: the ``colab`` path on the CPU: its recipes (steps and evaluation sizes capped),
  the Hub loaders reading shipped rows in the Hub schemas, and a random stand-in with TinyLlama's
  architecture (``course_utils.course.rehearsal``). What ``make test`` runs to test the T4 path.
- ``auto``: ``colab`` when CUDA is available, ``tiny`` otherwise; prints one banner saying which
  and why.

``COURSE_PROFILE=tiny`` (or ``colab``) in the environment overrides whatever the notebook asks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from course_utils.course import rehearsal
from course_utils.course.paths import COURSE_MODEL_DIR

PROFILE_NAMES = ("tiny", "colab", "rehearsal", "auto")
ENV_VAR = "COURSE_PROFILE"
TINYLLAMA_BASE = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"


class ProfileError(ValueError):
    """A profile that does not exist or cannot run on this machine."""


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the scales. Units are in the names.

    ``compute_dtype`` is the dtype of activations and of 16/32-bit weights; ``load_in_4bit`` says
    whether QLoRA lessons quantize the base model to NF4 (bitsandbytes runs NF4 on the CPU too, so
    the ``tiny`` profile executes real QLoRA, just slowly per parameter).
    """

    name: str
    model_name_or_path: str
    device: str
    compute_dtype: torch.dtype
    load_in_4bit: bool
    data_source: str  # "world" (data/world) or "hub" (UltraChat, Orca DPO pairs)
    #: where the Hub loaders read: ``None`` is the Hub itself, else a folder of shipped rows in
    #: the Hub schemas (``course_utils.course.rehearsal.FILES``)
    hub_data_dir: str | None = None

    @property
    def dtype_name(self) -> str:
        """``"float32"``, ``"float16"`` or ``"bfloat16"``."""
        return str(self.compute_dtype).removeprefix("torch.")

    @property
    def fp16(self) -> bool:
        """Value for a trl/transformers config's ``fp16=`` (mixed precision with fp16)."""
        return self.compute_dtype == torch.float16

    @property
    def bf16(self) -> bool:
        """Value for ``bf16=``; set explicitly because trl 1.x defaults to ``bf16=True``."""
        return self.compute_dtype == torch.bfloat16

    @property
    def use_cpu(self) -> bool:
        return self.device == "cpu"


def cuda_compute_dtype() -> torch.dtype:
    """bf16 where the GPU computes it natively (Ampere and newer), else fp16 (a T4 is Turing)."""
    major, _ = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


def tiny_profile() -> Profile:
    return Profile(
        name="tiny", model_name_or_path=str(COURSE_MODEL_DIR), device="cpu",
        compute_dtype=torch.float32, load_in_4bit=True, data_source="world")


def colab_profile() -> Profile:
    if not torch.cuda.is_available():
        raise ProfileError(
            "The 'colab' profile needs a CUDA GPU and none is visible here. On Colab choose "
            "Runtime > Change runtime type > T4 GPU and run again; on this machine use "
            "PROFILE = 'tiny' (or 'auto', which picks it), or unset COURSE_PROFILE.")
    return Profile(
        name="colab", model_name_or_path=TINYLLAMA_BASE, device="cuda",
        compute_dtype=cuda_compute_dtype(), load_in_4bit=True, data_source="hub")


def rehearsal_profile() -> Profile:
    device = "cpu"
    if rehearsal.rehearsal_scale() == "full":
        if not torch.cuda.is_available():
            raise ProfileError("COURSE_REHEARSAL_SCALE=full rehearses the T4 path at TinyLlama's scale and "
                               "needs a CUDA GPU (scripts/t4_check.py); unset it for the CPU rehearsal")
        device = "cuda"
    rehearsal.install_guards()
    return Profile(
        name="rehearsal", model_name_or_path=str(rehearsal.build_standin()), device=device,
        compute_dtype=rehearsal.T4_DTYPE, load_in_4bit=True, data_source="hub",
        hub_data_dir=str(rehearsal.REHEARSAL_DATA_DIR))


def get_profile(name: str = "auto", verbose: bool = True) -> Profile:
    """Resolve a profile name (``tiny``, ``colab`` or ``auto``) into a ``Profile``.

    ``COURSE_PROFILE`` in the environment wins over ``name``. ``auto`` picks ``colab`` when CUDA is
    available and ``tiny`` otherwise, and prints one banner saying so. Raises ``ProfileError`` (a
    ``ValueError``) for an unknown name, or for ``colab`` on a machine without CUDA.
    """
    requested = name
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        name = override
    key = str(name).strip().lower()
    if key not in PROFILE_NAMES:
        source = f"{ENV_VAR}={override!r}" if override else f"profile {requested!r}"
        raise ProfileError(f"unknown {source}; valid profiles: {', '.join(PROFILE_NAMES)}")
    if key == "auto":
        if torch.cuda.is_available():
            why = f"a CUDA GPU is available ({torch.cuda.get_device_name(0)})"
            profile = colab_profile()
        else:
            why = "no CUDA GPU is available"
            profile = tiny_profile()
        if verbose:
            print(f"[course] profile '{profile.name}' chosen automatically because {why}: "
                  f"{profile.model_name_or_path} on {profile.device} in {profile.dtype_name}"
                  f"{', 4-bit NF4 for QLoRA' if profile.load_in_4bit else ''}. "
                  f"To choose, set PROFILE = 'tiny' or 'colab' in the parameters cell, "
                  f"or {ENV_VAR}=tiny in the environment.")
        return profile
    profile = {"tiny": tiny_profile, "colab": colab_profile, "rehearsal": rehearsal_profile}[key]()
    if verbose:
        via = f" (from {ENV_VAR})" if override else ""
        print(f"[course] profile '{profile.name}'{via}: {profile.model_name_or_path} on "
              f"{profile.device} in {profile.dtype_name}.")
    return profile
