"""rlkit.kernels.triton_support.pdl: the launch options of programmatic dependent launch are
on only for a CUDA device that has it (compute capability 9.0+) and can be turned off."""

from __future__ import annotations

import torch
from rlkit.kernels import triton_support as ts


def test_pdl_is_off_off_cuda():
    assert ts.pdl(torch.device("cpu")) == {"PDL": False}


def test_pdl_follows_the_switch_and_the_capability(monkeypatch):
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(ts, "_HAS_GDC", True)  # a Triton with gdc_wait, installed or not
    monkeypatch.setattr(ts, "_CAPABLE", {0: True})
    assert ts.pdl(dev) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(ts, "_PDL_ON", False)  # RLKIT_PDL=0
    assert ts.pdl(dev) == {"PDL": False}
    monkeypatch.setattr(ts, "_PDL_ON", True)
    monkeypatch.setattr(ts, "_HAS_GDC", False)  # a Triton without it
    assert ts.pdl(dev) == {"PDL": False}
    monkeypatch.setattr(ts, "_HAS_GDC", True)
    monkeypatch.setattr(ts, "_CAPABLE", {0: False})  # an Ampere GPU
    assert ts.pdl(dev) == {"PDL": False}
