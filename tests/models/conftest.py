import pytest
import torch

from mambatron.config import config_from_dict


def tiny_model_config(arch: str, **overrides):
    model = {
        "arch": arch,
        "d_model": 32,
        "n_layer": 2,
        "vocab_size": 61,
        "pad_vocab_multiple": 8,
        "d_state": 8,
        "d_conv": 4,
        "expand": 2,
        "headdim": 16,
        "ngroups": 1,
        "chunk_size": 8,
        "kernels": "reference",
    }
    model.update(overrides)
    return config_from_dict({"model": model}).model


@pytest.fixture(params=["mamba1", "mamba2"])
def arch(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
