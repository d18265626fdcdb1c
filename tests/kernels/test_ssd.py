"""The Triton SSD kernels against the reference: each stage, and the combined op's output and every gradient.

Without a GPU the kernels run in Triton's interpreter, in fp32 (bf16 is broken there), at tiny shapes (conftest.py
sets TRITON_INTERPRET and MAMBATRON_POISON, so outputs start as NaN and an element a kernel forgets to write fails).
"""

import pytest
import torch

from mambatron.kernels.ssd import _common, chunk_scan, mamba_chunk_scan_combined
from mambatron.kernels.ssd import reference as ref
from mambatron.kernels.ssd.bmm import bmm_chunk_fwd
from mambatron.kernels.ssd.chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from mambatron.kernels.ssd.chunk_scan import chunk_scan_fwd
from mambatron.kernels.ssd.chunk_state import chunk_state_fwd
from mambatron.kernels.ssd.state_passing import state_passing_bwd, state_passing_fwd
from tests.kernels.conftest import assert_close as assert_close_dtype
from tests.kernels.test_ssd_reference import make_inputs, packed_seq_idx

pytestmark = pytest.mark.usefixtures("triton_interpreter")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
# The tests run fp32 tensors. On the GPU, tl.dot multiplies fp32 operands in tf32 (10-bit mantissa), so the bf16
# tolerance applies there; the interpreter computes in exact fp32.
TOLERANCE_DTYPE = torch.float32 if _common.interpreting() else torch.bfloat16


def assert_close(actual, expected, name=""):
    assert_close_dtype(actual, expected, name, TOLERANCE_DTYPE)


def fp32_inputs(**kwargs):
    return {k: v.to(DEVICE) for k, v in make_inputs(dtype=torch.float32, **kwargs).items()}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 along the chunk and dstate, so that chunk 16 / dstate 16 run the multi-tile loops."""
    if not _common.interpreting():
        pytest.skip("tiles under 16 are only valid in the interpreter")
    monkeypatch.setattr(_common, "MAX_CHUNK_BLOCK", 8)
    monkeypatch.setattr(_common, "MAX_DSTATE_BLOCK", 8)


@pytest.fixture
def uneven_tiles(small_tiles, monkeypatch):
    """Small tiles, and output tiles unlike the inner loop's steps: the forward's loop takes half an output tile per
    step and its programs split the head in two (headdim 16), the dx backward's loop starts inside a step that begins
    before the output tile; the dstates backward walks 4 positions per step and splits dstate over programs of 4;
    the dCB backward takes tiles of 4 and splits a group's heads in two runs, each summing its own part of dCB."""
    monkeypatch.setattr(
        chunk_scan, "TILES", {"fwd": (8, 4, 4, 8), "bwd_dx": (4, 8, 8), "bwd_dstates": (4, 4), "bwd_dcb": (4, 2, 0)}
    )


@pytest.fixture
def prefetch_tiles(uneven_tiles, monkeypatch):
    """The uneven tiles, with the dCB backward walking each group's three heads in one run and loading each head's
    dA_cumsum and dt one head ahead (the last head loads itself again)."""
    monkeypatch.setitem(chunk_scan.TILES, "bwd_dcb", (4, 1, 1))


# Stages ------------------------------------------------------------------------------------------------------------

CHUNK = 16
SEQ_IDX = packed_seq_idx(2, 50, [[5, 27], [16, 1]]).to(DEVICE)
DT_ARGS = dict(dt_softplus=True, dt_limit=(0.05, 2.0))


def stage_inputs():
    inputs = fp32_inputs()
    dA_cumsum, dt = ref.chunk_cumsum_ref(inputs["dt"], inputs["A"], CHUNK, inputs["dt_bias"], **DT_ARGS)
    # The kernels index their fp32 intermediates as contiguous tensors.
    return inputs, dA_cumsum.contiguous(), dt.contiguous()


def test_chunk_cumsum_fwd_bwd():
    inputs = fp32_inputs()
    dt_in, A, dt_bias = (inputs[k].requires_grad_() for k in ("dt", "A", "dt_bias"))
    dA_cumsum, dt_out = chunk_cumsum_fwd(dt_in, A, CHUNK, dt_bias, **DT_ARGS)
    dA_cumsum_ref, dt_out_ref = ref.chunk_cumsum_ref(dt_in, A, CHUNK, dt_bias, **DT_ARGS)
    assert_close(dA_cumsum, dA_cumsum_ref, "dA_cumsum")
    assert_close(dt_out, dt_out_ref, "dt_out")

    g_cumsum, g_dt, g_chunk = torch.randn_like(dA_cumsum), torch.randn_like(dt_out), torch.randn_like(dA_cumsum[..., 0])
    loss = (dA_cumsum_ref * g_cumsum).sum() + (dt_out_ref * g_dt).sum() + (dA_cumsum_ref[..., -1] * g_chunk).sum()
    expected = torch.autograd.grad(loss, (dt_in, A, dt_bias))
    actual = chunk_cumsum_bwd(g_cumsum, g_chunk, g_dt, dt_in.detach(), A.detach(), dt_out, dt_bias.detach(), **DT_ARGS)
    for name, a, e in zip(("ddt", "dA", "ddt_bias"), actual, expected):
        assert_close(a, e, name)


def test_chunk_state(small_tiles):
    inputs, dA_cumsum, dt = stage_inputs()
    states = chunk_state_fwd(inputs["B"], inputs["x"], dt, dA_cumsum, SEQ_IDX)
    assert_close(states, ref.chunk_state_ref(inputs["B"], inputs["x"], dt, dA_cumsum, SEQ_IDX))


def test_state_passing_fwd_bwd():
    inputs, dA_cumsum, dt = stage_inputs()
    states = ref.chunk_state_ref(inputs["B"], inputs["x"], dt, dA_cumsum, SEQ_IDX).requires_grad_()
    dA_chunk = dA_cumsum[..., -1].clone().requires_grad_()
    initial = inputs["initial_states"].requires_grad_()
    prev_ref, final_ref = ref.state_passing_ref(states, dA_chunk, initial, SEQ_IDX, CHUNK)
    prev, final = state_passing_fwd(states.detach(), dA_cumsum, initial.detach(), SEQ_IDX)
    assert_close(prev, prev_ref, "prev_states")
    assert_close(final, final_ref, "final_states")

    g_prev, g_final = torch.randn_like(prev), torch.randn_like(final)
    loss = (prev_ref * g_prev).sum() + (final_ref * g_final).sum()
    expected = torch.autograd.grad(loss, (states, initial, dA_chunk))
    actual = state_passing_bwd(prev, g_prev, dA_cumsum, g_final, SEQ_IDX)
    for name, a, e in zip(("dstates", "dinitial_states", "ddA_chunk"), actual, expected):
        assert_close(a, e, name)


def test_bmm_chunk(small_tiles):
    inputs = fp32_inputs(dstate=16)
    CB = bmm_chunk_fwd(inputs["C"], inputs["B"], CHUNK, SEQ_IDX)
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=DEVICE).tril()
    # Only s <= l is computed (the scan is causal).
    assert_close(CB[..., causal], ref.bmm_chunk_ref(inputs["C"], inputs["B"], CHUNK, SEQ_IDX)[..., causal])


@pytest.mark.parametrize("tiles", ["whole", "small", "uneven"])
def test_chunk_scan(tiles, request):
    if tiles != "whole":
        request.getfixturevalue(f"{tiles}_tiles")
    inputs, dA_cumsum, dt = stage_inputs()
    x, B, C, D, z = (inputs[k] for k in ("x", "B", "C", "D", "z"))
    states = ref.chunk_state_ref(B, x, dt, dA_cumsum, SEQ_IDX)
    prev, _ = ref.state_passing_ref(states, dA_cumsum[..., -1], inputs["initial_states"], SEQ_IDX, CHUNK)
    CB = ref.bmm_chunk_ref(C, B, CHUNK, SEQ_IDX).contiguous()
    prev = prev.contiguous()
    out, out_x = chunk_scan_fwd(CB, x, dt, dA_cumsum, C, prev, D, z, SEQ_IDX)
    assert_close(out, ref.chunk_scan_ref(CB, x, dt, dA_cumsum, C, prev, D, z, SEQ_IDX), "out")
    assert_close(out_x, ref.chunk_scan_ref(CB, x, dt, dA_cumsum, C, prev, D, None, SEQ_IDX), "out_x")


# The combined op: output and every gradient ---------------------------------------------------------------------

CASES = {
    # seqlen not a multiple of the chunk, 3 documents in a row (one of 1 token), groups, D per head, z, dt processing;
    # x, z, B, C strided like the slices of one projection in Mamba2.
    "full": dict(
        shape=dict(batch=2, seqlen=50, nheads=4, headdim=8, ngroups=2, dstate=8),
        seq_idx=[[5, 27], [16, 1]],
        drop=(),
        kwargs=dict(dt_softplus=True, dt_limit=(0.05, 2.0)),
        strided=True,
    ),
    # A chunk size that is not a power of two, one head per group.
    "odd_chunk": dict(
        shape=dict(batch=1, seqlen=30, nheads=2, headdim=8, ngroups=2, dstate=8),
        seq_idx=[[13]],
        drop=("z",),
        kwargs=dict(dt_softplus=True),
        chunk_size=12,
    ),
    # Multi-tile loops, D per head×headdim, one group, nothing optional, seqlen a multiple of the chunk.
    "tiled_plain": dict(
        shape=dict(batch=1, seqlen=48, nheads=2, headdim=16, ngroups=1, dstate=16, D_per_channel=True),
        seq_idx=None,
        drop=("z", "dt_bias", "initial_states"),
        kwargs=dict(),
        tiles="small",
    ),
    # Multi-tile loops with documents crossing tile and chunk boundaries, initial states and z, no softplus.
    "tiled_docs": dict(
        shape=dict(batch=2, seqlen=37, nheads=4, headdim=16, ngroups=2, dstate=16, D_per_channel=True),
        seq_idx=[[9, 14], [3]],
        drop=("dt_bias",),
        kwargs=dict(dt_limit=(0.0, 1.5)),
        tiles="small",
    ),
}
# The same with output tiles unlike the inner loops' steps, and three heads per group, which these tiles' dCB
# backward splits into runs of 2 and 1.
CASES["uneven_tiles"] = {
    **CASES["tiled_docs"],
    "shape": {**CASES["tiled_docs"]["shape"], "nheads": 6},
    "tiles": "uneven",
}
CASES["dcb_prefetch"] = {**CASES["uneven_tiles"], "tiles": "prefetch"}


@pytest.mark.parametrize("case", list(CASES))
def test_combined_matches_reference(case, request):
    spec = CASES[case]
    if spec.get("tiles"):
        request.getfixturevalue(f"{spec['tiles']}_tiles")
    inputs = fp32_inputs(**spec["shape"])
    if "dt_softplus" not in spec["kwargs"]:
        # Without softplus, dt is used as given: keep it positive like a processed dt.
        inputs["dt"] = inputs["dt"].abs() * 0.5
    for name in spec["drop"]:
        del inputs[name]
    if spec.get("strided"):
        for name in ("x", "z", "B", "C"):
            inputs[name] = torch.cat([inputs[name], inputs[name]], dim=-1)[..., : inputs[name].shape[-1]]
            assert not inputs[name].is_contiguous()
    batch, seqlen = spec["shape"]["batch"], spec["shape"]["seqlen"]
    seq_idx = packed_seq_idx(batch, seqlen, spec["seq_idx"]).to(DEVICE) if spec["seq_idx"] else None
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    chunk_size = spec.get("chunk_size", CHUNK)
    kwargs = dict(chunk_size=chunk_size, seq_idx=seq_idx, return_final_states=True, **spec["kwargs"])

    y, final = mamba_chunk_scan_combined(**leaves, **kwargs)
    y_ref, final_ref = ref.mamba_chunk_scan_combined_ref(**leaves, **kwargs)
    assert_close(y, y_ref, "y")
    assert_close(final, final_ref, "final_states")

    g_y, g_final = torch.randn_like(y), torch.randn_like(final)
    names = [k for k in GRAD_NAMES if k in leaves]
    grads = torch.autograd.grad((y * g_y).sum() + (final * g_final).sum(), [leaves[k] for k in names])
    grads_ref = torch.autograd.grad((y_ref * g_y).sum() + (final_ref * g_final).sum(), [leaves[k] for k in names])
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, f"d{name}")


def test_gradient_through_final_states_only():
    inputs = fp32_inputs(batch=1, seqlen=20, nheads=2, ngroups=1)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    kwargs = dict(chunk_size=CHUNK, dt_softplus=True, return_final_states=True)
    _, final = mamba_chunk_scan_combined(**leaves, **kwargs)
    _, final_ref = ref.mamba_chunk_scan_combined_ref(**leaves, **kwargs)
    # C, D and z only act on the output.
    names = ("x", "dt", "A", "B", "dt_bias", "initial_states")
    grads = torch.autograd.grad(final.sum(), [leaves[k] for k in names])
    grads_ref = torch.autograd.grad(final_ref.sum(), [leaves[k] for k in names])
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, f"d{name}")


def test_grid_bucket_steps_by_a_factor_of_four():
    sizes = (1, 2, 3, 8, 9, 32, 33, 128, 129, 1024, 2048, 2049)
    assert [_common.grid_bucket(n) for n in sizes] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6]
    assert _common.grid_bucket(4, 4, 4) == _common.grid_bucket(64)


def test_autotuning_picks_are_kept_per_grid_size():
    """Every autotuned SSD kernel keys its pick on the launch's grid bucket as well as on the shapes that set its
    tiles, so a small first call (a check, an evaluation) and a large one each get their own pick; on the shape keys
    alone the large call would reuse the small one's."""
    from mambatron.kernels._common import autotuners, reset_autotuning

    reset_autotuning()
    for batch, seqlen in ((1, CHUNK), (2, 8 * CHUNK)):  # 1 and 16 chunks in all: every grid in another bucket
        leaves = {k: v.requires_grad_() for k, v in fp32_inputs(batch=batch, seqlen=seqlen, ngroups=1).items()}
        mamba_chunk_scan_combined(**leaves, chunk_size=CHUNK, dt_softplus=True).sum().backward()
    tuners = {t.base_fn.__name__: t for t in autotuners() if t.base_fn.__module__.startswith("mambatron.kernels.ssd")}
    assert len(tuners) == 7, sorted(tuners)
    for name, tuner in tuners.items():
        keys = list(tuner.cache)
        assert len(keys) == 2, (name, keys)
        # The same tiles and dtypes: only the grid bucket tells the two calls apart.
        assert [a == b for a, b in zip(*keys)].count(False) == 1, (name, keys)


# Dispatch and validation -----------------------------------------------------------------------------------------


def test_reference_without_triton(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("on CUDA tensors the Triton path always runs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = fp32_inputs(seqlen=20)
    y = mamba_chunk_scan_combined(**inputs, chunk_size=CHUNK, dt_softplus=True)
    assert torch.equal(y, ref.mamba_chunk_scan_combined_ref(**inputs, chunk_size=CHUNK, dt_softplus=True))


def test_fp64_runs_the_reference():
    inputs = {k: v.to(DEVICE) for k, v in make_inputs(seqlen=20).items()}
    y = mamba_chunk_scan_combined(**inputs, chunk_size=CHUNK)
    assert y.dtype == torch.float64
    assert torch.equal(y, ref.mamba_chunk_scan_combined_ref(**inputs, chunk_size=CHUNK))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(dt=torch.zeros(2, 20, 3)), ValueError, r"dt must have shape \(2, 20, 4\)"),
        (dict(D=torch.zeros(4, 3)), ValueError, "D must have shape"),
        (dict(B=torch.zeros(2, 20, 3, 8), C=torch.zeros(2, 20, 3, 8)), ValueError, "multiple of ngroups"),
        (dict(initial_states=torch.zeros(2, 4, 8, 9)), ValueError, "initial_states must have shape"),
        (dict(seq_idx=torch.zeros(2, 20)), TypeError, "seq_idx must be int32 or int64"),
        (dict(x=torch.zeros(2, 20, 4, 8, dtype=torch.int32)), TypeError, "x must be fp16, bf16, fp32 or fp64"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(dt_limit=(1.0, 0.5)), ValueError, "dt_limit must be"),
    ],
)
def test_validation(change, error, match):
    args = {**make_inputs(seqlen=20, dtype=torch.float32), "chunk_size": CHUNK, **change}
    with pytest.raises(error, match=match):
        mamba_chunk_scan_combined(**args)


def test_rejects_sizes_beyond_32_bit_offsets():
    if not _common.interpreting():
        pytest.skip("meta tensors take the Triton path only under the interpreter")
    seqlen = 2**31
    meta = lambda *shape: torch.empty(*shape, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        mamba_chunk_scan_combined(
            meta(1, seqlen, 1, 1), meta(1, seqlen, 1), meta(1), meta(1, seqlen, 1, 1), meta(1, seqlen, 1, 1), 256
        )
