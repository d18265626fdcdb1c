"""The Triton causal conv1d against the reference: output, final states, every gradient, and the decoding step.

Without a GPU the kernels run in Triton's interpreter in fp32 at tiny shapes (see conftest.py); on a GPU the same
cases also run in bf16.
"""

import pytest
import torch

from mambatron.kernels.conv1d import (
    causal_conv1d_fn,
    causal_conv1d_fn_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from tests.kernels.conftest import assert_close

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def dtypes():
    return [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def make_inputs(batch, dim, seqlen, width, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    inputs = dict(
        x=rand(batch, dim, seqlen).to(dtype),
        weight=rand(dim, width),
        bias=rand(dim),
        initial_states=rand(batch, dim, width - 1).to(dtype),
    )
    return {k: v.to(device).requires_grad_() for k, v in inputs.items()}


def run(fn, inputs, upcast=False, **kwargs):
    args = {k: (v.detach().float().requires_grad_() if upcast else v) for k, v in inputs.items()}
    out, final = fn(**args, return_final_states=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device)
    dfinal = torch.randn(final.shape, generator=g).to(out.device)
    grads = torch.autograd.grad((out.float() * dout).sum() + (final.float() * dfinal).sum(), list(args.values()))
    return out, final, dict(zip(args, grads))


def check(inputs, dtype, **kwargs):
    out, final, grads = run(causal_conv1d_fn, inputs, **kwargs)
    out_ref, final_ref, grads_ref = run(causal_conv1d_fn_ref, inputs, upcast=True, **kwargs)
    assert out.dtype == inputs["x"].dtype
    assert_close(out, out_ref, "out", dtype)
    assert_close(final, final_ref, "final_states", dtype)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close(grad, grads_ref[name], f"d{name}", dtype)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("activation", [None, "silu"])
def test_documents_and_states(dtype, activation, device):
    """Several documents per row (one shorter than the kernel, one on a tile edge), batch > 1, odd length."""
    inputs = make_inputs(batch=2, dim=5, seqlen=70, width=4, dtype=dtype, device=device)
    seq_idx = torch.zeros(2, 70, dtype=torch.int32)
    seq_idx[0, 2:] = 1
    seq_idx[0, 3:] = 2
    seq_idx[0, 64:] = 3
    seq_idx[1, 40:] = 1
    check(inputs, dtype, seq_idx=seq_idx.to(device), activation=activation)


@pytest.mark.parametrize("width", [2, 3])
def test_widths_without_documents(width, device):
    inputs = make_inputs(batch=1, dim=3, seqlen=9, width=width, dtype=torch.float32, device=device)
    check(inputs, torch.float32, activation="silu")


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("activation", [None, "silu"])
def test_channel_last_view_read_in_place(dtype, activation, device):
    """x as Mamba2 passes it: the xBC columns of a (batch, seqlen, features) in_proj output, transposed. It is read in
    place (not copied), out and dx come back channel-last, and everything matches the reference."""
    batch, dim, seqlen, width = 2, 7, 45, 4
    g = torch.Generator().manual_seed(2)
    zxbcdt = torch.randn(batch, seqlen, 3 + dim + 2, generator=g).to(dtype).to(device).requires_grad_()
    inputs = dict(
        x=zxbcdt[..., 3 : 3 + dim].transpose(1, 2),
        weight=torch.randn(dim, width, generator=g).to(device).requires_grad_(),
        bias=torch.randn(dim, generator=g).to(device).requires_grad_(),
        initial_states=torch.randn(batch, dim, width - 1, generator=g).to(dtype).to(device).requires_grad_(),
    )
    assert inputs["x"].stride(1) == 1 and not inputs["x"].is_contiguous()
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    seq_idx[0, 20:] = 1
    seq_idx = seq_idx.to(device)
    out = causal_conv1d_fn(**inputs, seq_idx=seq_idx, activation=activation)
    assert out.stride(1) == 1, "a channel-last input gives a channel-last output"
    (dx,) = torch.autograd.grad(out.float().sin().sum(), inputs["x"])
    assert dx.stride(1) == 1
    check(inputs, dtype, seq_idx=seq_idx, activation=activation)


def test_no_bias_no_initial_states(device):
    inputs = make_inputs(batch=2, dim=70, seqlen=11, width=4, dtype=torch.float32, device=device)  # 2 channel blocks
    del inputs["bias"], inputs["initial_states"]
    check(inputs, torch.float32)


def test_update_matches_reference(device):
    g = torch.Generator().manual_seed(0)
    x, state = torch.randn(3, 6, generator=g), torch.randn(3, 6, 4, generator=g)
    weight, bias = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    x, state, weight, bias = (t.to(device) for t in (x, state, weight, bias))
    state_ref = state.clone()
    out = causal_conv1d_update(x, state, weight, bias, activation="silu")
    out_ref = causal_conv1d_update_ref(x, state_ref, weight, bias, activation="silu")
    assert_close(out, out_ref, "out")
    assert_close(state, state_ref, "conv_state")


def test_clear_errors(device):
    x, w = torch.randn(1, 4, 8, device=device), torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        causal_conv1d_fn(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"initial_states must be \(batch, dim, width - 1\)"):
        causal_conv1d_fn(x, w, initial_states=torch.zeros(1, 4, 3, device=device))
    with pytest.raises(TypeError, match="seq_idx must be int32"):
        causal_conv1d_fn(x, w, seq_idx=torch.zeros(1, 8, dtype=torch.long, device=device))


ROWS_TILE = 64  # the row kernels' tile length in api's launch tables and in the interpreter


def _force_kernel(monkeypatch, table_names, channel_last, name, group=8):
    """Make the launch tables pick kernel ``name`` for this layout, and record which kernels are launched."""
    from mambatron.kernels.conv1d import api, kernel

    for table_name in table_names:
        table = dict(getattr(api, table_name))
        block_d, block_l, warps = table[channel_last][:3]
        if name == "rows":
            # The row kernels unroll their whole tile; at the slot kernels' 128-256 positions one sm_90 compile takes
            # minutes (64 positions: about 30 s), so they get at most the ROWS_TILE the launch tables give them.
            block_l = min(block_l, ROWS_TILE)
        table[channel_last] = (block_d, block_l, warps, name, group)
        monkeypatch.setattr(api, table_name, table)
    launched = []
    for attr in dir(kernel):
        if attr.startswith("_conv_") and attr.endswith("_kernel") and attr != "_conv_update_kernel":
            real = getattr(kernel, attr)

            class Spy:
                def __init__(self, real, attr):
                    self.real, self.attr = real, attr

                def __getitem__(self, grid):
                    launched.append(self.attr)
                    return self.real[grid]

            monkeypatch.setattr(kernel, attr, Spy(real, attr))
    return launched


def _layout_inputs(channel_last, batch, dim, seqlen, width, seed=3):
    g = torch.Generator().manual_seed(seed)
    if channel_last:
        x = torch.randn(batch, seqlen, dim + 3, generator=g)[..., 1 : 1 + dim].transpose(1, 2)
    else:
        x = torch.randn(batch, dim, seqlen, generator=g)
    return dict(x=x, weight=torch.randn(dim, width, generator=g), bias=torch.randn(dim, generator=g),
                initial_states=torch.randn(batch, dim, width - 1, generator=g))  # fmt: skip


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("name", ["shifted", "slots", "rows"])
def test_every_forward_kernel_on_both_layouts(channel_last, name, device, monkeypatch):
    """The launch table picks a forward kernel per layout; every other one must be right too (a sweep may pick it)."""
    launched = _force_kernel(monkeypatch, ["_GPU_FWD"], channel_last, name)
    batch, dim, seqlen = 2, 6, 37
    inputs = {k: v.to(device).requires_grad_() for k, v in _layout_inputs(channel_last, batch, dim, seqlen, 4).items()}
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    seq_idx[1, 9:] = 1
    check(inputs, torch.float32, seq_idx=seq_idx.to(device), activation="silu")
    assert launched[0] == f"_conv_fwd_{name}_kernel".replace("_shifted", "")


# (layout, width, rows per load group): every width and both group sizes on Mamba2's layout, and the kernels on a
# time-contiguous tensor too (they take any strides, though the launch table does not pick them there). Width 4 with
# groups of 4 in the backward is left out: its three sm_90 compiles here take minutes, and no launch table picks it.
ROW_CASES = [(True, 4, 8), (True, 3, 4), (True, 2, 8), (False, 4, 8)]


def test_row_kernel_tiles_stay_short():
    """The launch tables give the row kernels at most ROWS_TILE positions per tile: they unroll it whole, and a longer
    tile makes the first step wait minutes on compiling them."""
    from mambatron.kernels.conv1d import api

    for table in (api._GPU_FWD, api._GPU_BWD):
        rows = [entry for entry in table.values() if entry[3] == "rows"]
        assert rows and all(entry[1] <= ROWS_TILE for entry in rows), table


@pytest.mark.parametrize(("channel_last", "width", "group"), ROW_CASES)
def test_row_kernels_documents_states_and_widths(channel_last, width, group, device, monkeypatch):
    """The row kernels (forward and backward) against the reference over three 64-position tiles (the
    interpreter's), the last one running past the end: documents that start inside the first three rows, last one
    position, end one or two rows before or after a tile edge (the backward's prologue reads across it); initial
    states; widths 2-4."""
    launched = _force_kernel(monkeypatch, ["_GPU_FWD", "_GPU_BWD"], channel_last, "rows", group)
    batch, dim, seqlen = 2, 3, 150
    inputs = {
        k: v.to(device).requires_grad_() for k, v in _layout_inputs(channel_last, batch, dim, seqlen, width).items()
    }
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    for start in (1, 8, 9, 62, 66, 127):
        seq_idx[0, start:] += 1
    for start in (2, 63, 129):
        seq_idx[1, start:] += 1
    for activation in ("silu", None):
        check(inputs, torch.float32, seq_idx=seq_idx.to(device), activation=activation)
    without = {k: v for k, v in inputs.items() if k != "initial_states"}
    check(without, torch.float32, activation="silu")
    assert set(launched) == {"_conv_fwd_rows_kernel", "_conv_bwd_rows_kernel"}


def test_wide_kernels_fall_back_to_the_reference(device):
    """Widths above MAX_WIDTH run the reference in causal_conv1d_fn; the fused paths' entry points refuse them."""
    from mambatron.kernels.conv1d import api

    inputs = make_inputs(batch=1, dim=3, seqlen=12, width=api.MAX_WIDTH + 1, dtype=torch.float32, device=device)
    check(inputs, torch.float32, activation="silu")
    with pytest.raises(ValueError, match="width of at most 9"):
        api.conv_forward(inputs["x"].detach(), inputs["weight"].detach(), None, None, None, True)
