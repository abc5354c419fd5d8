"""Multiresolution hash encoding (csrc/hashgrid, model/hashgrid.py) against the plain-PyTorch
reference in tests/reference/hashgrid_reference.py: outputs, table gradients, input gradients in
every dimension, gradcheck, out-of-range inputs, errors and determinism."""
import pytest
import torch

from model.hashgrid import HashGridEncoder, _HashEncode, hash_encode, level_resolutions
from tests.conftest import assert_close
from tests.reference.hashgrid_reference import PRIMES, hash_encode_reference, reference_resolutions
from model.ext import C


def level_kinds(resolutions, dim, table_size):
    """'dense' or 'hashed' per level, by the rule of the header: (R + 1)^D <= S is dense."""
    return ["dense" if (r + 1) ** dim <= table_size else "hashed" for r in resolutions]


def random_case(dim, num_levels, log2_size, features, num_points, dtype, base=2, finest=48):
    x = torch.rand(num_points, dim, dtype=dtype)
    table = torch.randn(num_levels, 2 ** log2_size, features, dtype=dtype)
    return x, table, level_resolutions(num_levels, base, finest)


def encode_with_grads(encode, x, table, grad_out):
    x = x.detach().clone().requires_grad_()
    table = table.detach().clone().requires_grad_()
    out = encode(x, table)
    out.backward(grad_out)
    return out.detach(), x.grad, table.grad


def interior_points(num, dim, resolutions, dtype, margin=0.02):
    """Random points whose fraction in every level's cell is in [margin, 1 - margin]: away from
    the cell faces, where the multilinear map has kinks that finite differences would straddle."""
    kept = []
    while sum(len(k) for k in kept) < num:
        x = torch.rand(4096, dim, dtype=torch.float64)
        ok = torch.ones(len(x), dtype=torch.bool)
        for r in resolutions:
            frac = x * r - (x * r).floor()
            ok &= ((frac > margin) & (frac < 1 - margin)).all(dim=1)
        kept.append(x[ok])
    return torch.cat(kept)[:num].to(dtype)


# --- resolutions and the index convention ---------------------------------------------------

def test_level_resolutions_grow_geometrically():
    res = level_resolutions(16, 16, 2048)
    assert res == reference_resolutions(16, 16, 2048)
    assert res[0] == 16 and res[-1] == 2048
    assert all(a < b for a, b in zip(res, res[1:]))
    assert level_resolutions(1, 16, 2048) == [16]
    assert level_resolutions(4, 8, 8) == [8, 8, 8, 8]
    assert level_resolutions(5, 2, 32) == [2, 4, 8, 16, 32]


def test_grid_points_read_their_own_row():
    """At x = g / R the encoding is exactly the row of grid point g: the dense index
    sum_d g_d (R + 1)^d on a dense level, the XOR hash of the primes on a hashed one."""
    dim, size = 3, 2 ** 12
    resolutions = level_resolutions(2, 4, 40)  # (4+1)^3 = 125 dense, (40+1)^3 hashed
    assert level_kinds(resolutions, dim, size) == ["dense", "hashed"]
    table = torch.arange(size, dtype=torch.float64).repeat(2, 1)[:, :, None].contiguous()
    for level, r in enumerate(resolutions):
        g = torch.randint(0, r + 1, (50, dim))
        x = g.double() / r
        out = hash_encode(x, table, 4, 40)[:, level]
        if level == 0:
            expected = g[:, 0] + g[:, 1] * (r + 1) + g[:, 2] * (r + 1) ** 2
        else:
            expected = (g[:, 0] * PRIMES[0]) ^ (g[:, 1] * PRIMES[1] & 0xFFFFFFFF) \
                ^ (g[:, 2] * PRIMES[2] & 0xFFFFFFFF)
            expected = expected % size
        assert_close(out, expected.double(), atol=1e-9, rtol=0, what=f"level {level} rows")


@pytest.mark.parametrize("dim,resolution,log2_size", [(4, 3, 8), (3, 7, 9)])
def test_grid_that_exactly_fills_the_table_is_dense(dim, resolution, log2_size):
    """(R + 1)^D == S: the dense grid fits exactly, so every grid point has its own row."""
    assert (resolution + 1) ** dim == 2 ** log2_size
    table = torch.arange(2 ** log2_size, dtype=torch.float64)[None, :, None].contiguous()
    g = torch.stack(torch.meshgrid(*[torch.arange(resolution + 1)] * dim, indexing="ij"), -1)
    g = g.reshape(-1, dim)
    out = hash_encode(g.double() / resolution, table, resolution, resolution)[:, 0]
    expected = sum(g[:, d] * (resolution + 1) ** d for d in range(dim))
    assert_close(out, expected.double(), atol=1e-9, rtol=0, what="dense rows")
    assert sorted(out.long().tolist()) == list(range(2 ** log2_size))


# --- against the reference ------------------------------------------------------------------

CONFIGS = [(dim, features, log2_size) for dim in (3, 4) for features in (1, 2, 4)
           for log2_size in (6, 16)]


def test_sweep_covers_dense_and_hashed_levels():
    kinds = set()
    for dim, _, log2_size in CONFIGS:
        per_level = level_kinds(level_resolutions(4, 2, 48), dim, 2 ** log2_size)
        kinds.update(per_level)
        if (dim, log2_size) in ((3, 6), (4, 16)):
            assert set(per_level) == {"dense", "hashed"}, (dim, log2_size, per_level)
    assert kinds == {"dense", "hashed"}


@pytest.mark.parametrize("num_points", [1, 7, 600])
@pytest.mark.parametrize("dim,features,log2_size", CONFIGS)
def test_matches_reference_float64(dim, features, log2_size, num_points):
    x, table, res = random_case(dim, 4, log2_size, features, num_points, torch.float64)
    grad_out = torch.randn(num_points, 4 * features, dtype=torch.float64)
    out, gx, gt = encode_with_grads(lambda p, t: hash_encode(p, t, 2, 48), x, table, grad_out)
    ref_out, ref_gx, ref_gt = encode_with_grads(
        lambda p, t: hash_encode_reference(p, t, res), x, table, grad_out)
    assert_close(out, ref_out, atol=1e-12, rtol=1e-12, what="output")
    assert_close(gt, ref_gt, atol=1e-11, rtol=1e-11, what="table gradient")
    assert_close(gx, ref_gx, atol=1e-9, rtol=1e-10, what="input gradient")


@pytest.mark.parametrize("dim,features", [(3, 8), (4, 8), (4, 2)])
def test_matches_reference_float32(dim, features):
    x, table, res = random_case(dim, 5, 10, features, 2000, torch.float32, base=3, finest=300)
    grad_out = torch.randn(2000, 5 * features)
    out, gx, gt = encode_with_grads(lambda p, t: hash_encode(p, t, 3, 300), x, table, grad_out)
    ref_out, ref_gx, ref_gt = encode_with_grads(
        lambda p, t: hash_encode_reference(p, t, res), x, table, grad_out)
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5, what="output")
    assert_close(gt, ref_gt, atol=1e-4, rtol=1e-5, what="table gradient")
    # d/dx scales with the resolution (300) and sums cancelling corner terms.
    assert_close(gx, ref_gx, atol=2e-2, rtol=1e-4, what="input gradient")


def test_default_encoder_configuration_matches_reference():
    """4D, 16 levels of 2 features, 2^19 rows, resolutions 16..2048 (the deformer's encoder)."""
    encoder = HashGridEncoder(4, init_scale=1.0)
    assert set(level_kinds(encoder.resolutions, 4, 2 ** 19)) == {"dense", "hashed"}
    x = torch.rand(3000, 4)
    grad_out = torch.randn(3000, encoder.output_dim)
    table = encoder.table.detach()
    out, gx, gt = encode_with_grads(lambda p, t: hash_encode(p, t, 16, 2048), x, table, grad_out)
    ref_out, ref_gx, ref_gt = encode_with_grads(
        lambda p, t: hash_encode_reference(p, t, encoder.resolutions), x, table, grad_out)
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5, what="output")
    assert_close(gt, ref_gt, atol=1e-5, rtol=1e-5, what="table gradient")
    assert_close(gx, ref_gx, atol=0.5, rtol=1e-3, what="input gradient")  # up to 2048 * O(1)


@pytest.mark.parametrize("dim", [3, 4])
def test_input_gradient_in_every_dimension(dim):
    """Each dimension separately: non-zero for every point and equal to the reference (an encoder
    that differentiated only the first dimension would pass a test of the first column)."""
    x, table, res = random_case(dim, 4, 8, 2, 300, torch.float64)
    grad_out = torch.randn(300, 8, dtype=torch.float64)
    _, gx, _ = encode_with_grads(lambda p, t: hash_encode(p, t, 2, 48), x, table, grad_out)
    _, ref_gx, _ = encode_with_grads(lambda p, t: hash_encode_reference(p, t, res), x, table,
                                     grad_out)
    for d in range(dim):
        assert (gx[:, d] != 0).all(), f"dimension {d} has zero input gradients"
        assert_close(gx[:, d], ref_gx[:, d], atol=1e-9, rtol=1e-10, what=f"d/dx_{d}")
    # The same column by a central difference along dimension d alone, at interior points.
    xi = interior_points(20, dim, res, torch.float64)
    weights = torch.randn(20, 8, dtype=torch.float64)
    xg = xi.clone().requires_grad_()
    (hash_encode(xg, table, 2, 48) * weights).sum().backward()
    for d in range(dim):
        step = torch.zeros(dim, dtype=torch.float64)
        step[d] = 1e-7
        plus = (hash_encode(xi + step, table, 2, 48) * weights).sum(dim=1)
        minus = (hash_encode(xi - step, table, 2, 48) * weights).sum(dim=1)
        assert_close(xg.grad[:, d], (plus - minus) / 2e-7, atol=1e-4, rtol=1e-5,
                     what=f"finite difference d/dx_{d}")


@pytest.mark.parametrize("dim,log2_size", [(3, 5), (4, 7)])
def test_gradcheck(dim, log2_size):
    resolutions = level_resolutions(3, 2, 12)
    kinds = level_kinds(resolutions, dim, 2 ** log2_size)
    assert "dense" in kinds and "hashed" in kinds, kinds
    x = interior_points(6, dim, resolutions, torch.float64).requires_grad_()
    table = torch.randn(3, 2 ** log2_size, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: _HashEncode.apply(p, t, resolutions),
                                    (x, table), eps=1e-6, atol=1e-6, rtol=1e-5)
    # Each input alone, so that the needs_input_grad branches are checked too.
    assert torch.autograd.gradcheck(lambda p: _HashEncode.apply(p, table.detach(), resolutions),
                                    (x,), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda t: _HashEncode.apply(x.detach(), t, resolutions),
                                    (table,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradient_only_where_requested():
    x, table, _ = random_case(3, 2, 6, 2, 10, torch.float64)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(hash_encode(x, table, 2, 48).sum(), (x,))
    assert gx.shape == x.shape and table.grad is None
    grad_table, grad_x = C.hashgrid_backward(torch.ones(10, 4, dtype=torch.float64), x.detach(),
                                             table, level_resolutions(2, 2, 48), True, False)
    assert grad_x is None and grad_table.shape == table.shape


# --- sizes, range and errors ----------------------------------------------------------------

def test_empty_input():
    table = torch.randn(3, 64, 2, requires_grad=True)
    x = torch.empty(0, 4, requires_grad=True)
    out = hash_encode(x, table, 2, 8)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert x.grad.shape == (0, 4)
    assert torch.equal(table.grad, torch.zeros_like(table))


def test_out_of_range_is_clamped_with_zero_gradient():
    """Coordinates outside [0, 1] are encoded as the nearest point of [0, 1]^D and get zero
    gradient in the clamped dimensions only."""
    table = torch.randn(4, 2 ** 8, 2, dtype=torch.float64)
    inside = torch.rand(6, 4, dtype=torch.float64) * 0.8 + 0.1
    outside = inside.clone()
    outside[0, 0] = -0.3
    outside[1, 1] = 1.7
    outside[2, 2] = float("inf")
    outside[3, 3] = -float("inf")
    outside[4, :] = torch.tensor([2.0, -1.0, 5.0, -5.0])
    clamped = outside.clamp(0, 1)
    x = outside.clone().requires_grad_()
    out = hash_encode(x, table, 2, 48)
    assert_close(out, hash_encode(clamped, table, 2, 48), atol=0, rtol=0, what="clamped output")
    out.sum().backward()
    xc = clamped.clone().requires_grad_()
    hash_encode(xc, table, 2, 48).sum().backward()
    expected = torch.where((outside < 0) | (outside > 1), torch.zeros_like(xc.grad), xc.grad)
    assert_close(x.grad, expected, atol=0, rtol=0, what="input gradient outside [0, 1]")
    assert (x.grad[5] != 0).all() and (x.grad[4] == 0).all()


def test_boundary_coordinates_match_reference():
    """x = 0 and x = 1 exactly: the first and last cells, one-sided gradients."""
    res = level_resolutions(3, 2, 20)
    table = torch.randn(3, 2 ** 7, 4, dtype=torch.float64)
    x = torch.rand(8, 3, dtype=torch.float64)
    x[0] = 0.0
    x[1] = 1.0
    x[2, 0], x[3, 1], x[4, 2] = 1.0, 0.0, 1.0
    grad_out = torch.randn(8, 12, dtype=torch.float64)
    out, gx, gt = encode_with_grads(lambda p, t: hash_encode(p, t, 2, 20), x, table, grad_out)
    ref_out, ref_gx, ref_gt = encode_with_grads(
        lambda p, t: hash_encode_reference(p, t, res), x, table, grad_out)
    assert_close(out, ref_out, atol=1e-12, rtol=1e-12, what="output")
    assert_close(gx, ref_gx, atol=1e-10, rtol=1e-10, what="input gradient")
    assert_close(gt, ref_gt, atol=1e-12, rtol=1e-12, what="table gradient")
    assert (gx[:2] != 0).all()


def test_nan_coordinate_gives_nan_row_and_stays_in_bounds():
    table = torch.randn(4, 2 ** 8, 2)
    x = torch.rand(5, 4)
    x[2, 1] = float("nan")
    xg = x.clone().requires_grad_()
    tg = table.clone().requires_grad_()
    out = hash_encode(xg, tg, 2, 48)
    assert torch.isnan(out[2]).all()
    others = torch.tensor([0, 1, 3, 4])
    assert_close(out[others], hash_encode(x[others], table, 2, 48), atol=0, rtol=0,
                 what="rows of finite points")
    out.sum().backward()
    assert xg.grad[2, 1] == 0
    assert torch.isfinite(xg.grad[others]).all()


def test_non_contiguous_inputs():
    x, table, res = random_case(4, 3, 8, 2, 50, torch.float64)
    x_strided = torch.stack([x, torch.zeros_like(x)], dim=2).reshape(50, 8)[:, ::2]
    assert torch.equal(x_strided, x)
    assert not x_strided.is_contiguous()
    table_strided = table.transpose(0, 1).contiguous().transpose(0, 1)
    assert not table_strided.is_contiguous()
    assert_close(hash_encode(x_strided, table_strided, 2, 48),
                 hash_encode_reference(x, table, res),
                 atol=1e-12, rtol=1e-12, what="output of strided inputs")


F32, F64 = torch.float32, torch.float64
BAD_INPUTS = [  # x shape, x dtype, table shape, table dtype, expected message
    ((5, 2), F32, (2, 64, 2), F32, r"x must have shape \(N, 3\) or \(N, 4\), found \(5, 2\)"),
    ((5,), F32, (2, 64, 2), F32, r"x must have shape"),
    ((5, 3), torch.int64, (2, 64, 2), F32, r"x must be float32 or float64, found torch.int64"),
    ((5, 3), torch.float16, (2, 64, 2), torch.float16, r"x must be float32 or float64"),
    ((5, 3), F32, (64, 2), F32, r"table must have shape \(L, S, F\), found \(64, 2\)"),
    ((5, 3), F32, (2, 64, 2), F64,
     r"table must have the dtype of x \(torch.float32\), found torch.float64"),
    ((5, 3), F32, (2, 48, 2), F32, r"power of two.*found 48"),
    ((5, 3), F32, (2, 64, 3), F32, r"features per level must be one of \(1, 2, 4, 8\), found 3"),
    ((5, 3), F32, (65, 64, 2), F32, r"1 to 64 levels, found 65"),
]


@pytest.mark.parametrize("x_shape,x_dtype,table_shape,table_dtype,message", BAD_INPUTS)
def test_bad_inputs_raise_value_errors(x_shape, x_dtype, table_shape, table_dtype, message):
    x = torch.zeros(x_shape, dtype=x_dtype)
    table = torch.zeros(table_shape, dtype=table_dtype)
    with pytest.raises(ValueError, match=message):
        hash_encode(x, table, 2, 8)


def test_bad_resolutions_raise_value_errors():
    x, table = torch.rand(3, 3), torch.zeros(2, 64, 2)
    with pytest.raises(ValueError, match="base_resolution <= max_resolution"):
        hash_encode(x, table, 16, 8)
    with pytest.raises(ValueError, match="1 <= base_resolution"):
        hash_encode(x, table, 0, 8)
    with pytest.raises(ValueError, match=r"max_resolution must be <= 2\^24"):
        hash_encode(x, table, 2, 2 ** 25)
    with pytest.raises(ValueError, match="input_dim must be 3 or 4, found 2"):
        HashGridEncoder(2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4\), found \(3, 3\)"):
        HashGridEncoder(4, num_levels=2, log2_table_size=6)(x)


def test_extension_checks_say_expected_and_found():
    """The C++ entry points validate on their own (callers other than hash_encode)."""
    x, table = torch.rand(4, 3), torch.zeros(2, 64, 2)
    with pytest.raises(RuntimeError,
                       match=r"expected one resolution per table level \(2\), found 3"):
        C.hashgrid_forward(x, table, [2, 4, 8])
    with pytest.raises(RuntimeError, match=r"resolutions must be in \[1, 16777216\], found 0"):
        C.hashgrid_forward(x, table, [0, 4])
    with pytest.raises(RuntimeError,
                       match=r"x must have shape \(N, 3\) or \(N, 4\), found \[4, 5\]"):
        C.hashgrid_forward(torch.rand(4, 5), table, [2, 4])
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(4, 4\), found \[4, 3\]"):
        C.hashgrid_backward(torch.zeros(4, 3), x, table, [2, 4], True, True)
    with pytest.raises(RuntimeError,
                       match=r"table must have the dtype of x \(Float\), found Double"):
        C.hashgrid_forward(x, table.double(), [2, 4])


# --- determinism, autograd contract, module ---------------------------------------------------

def test_table_gradient_is_deterministic_across_runs_and_thread_counts():
    x, table, _ = random_case(4, 6, 10, 2, 20000, torch.float32, finest=512)
    grad_out = torch.randn(20000, 12)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (threads, threads, 1):
            torch.set_num_threads(num_threads)
            results.append(encode_with_grads(lambda p, t: hash_encode(p, t, 2, 512), x, table,
                                             grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other[2], results[0][2]), "table gradient differs between runs"
        assert torch.equal(other[1], results[0][1]), "input gradient differs between runs"


def test_double_backward_raises():
    x, table, _ = random_case(3, 2, 6, 2, 4, torch.float64)
    x.requires_grad_()
    table.requires_grad_()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(hash_encode(x, table, 2, 48).sum(), (x,), create_graph=True)


def test_encoder_module():
    encoder = HashGridEncoder(3, num_levels=4, features_per_level=4, log2_table_size=10,
                              base_resolution=4, max_resolution=64, init_scale=1e-3)
    assert encoder.table.shape == (4, 1024, 4)
    assert encoder.table.abs().max() <= 1e-3
    assert encoder.resolutions == [4, 10, 25, 64]
    assert encoder.output_dim == 16
    x = torch.rand(100, 3)
    out = encoder(x)
    assert out.shape == (100, 16) and out.dtype == torch.float32
    out.pow(2).sum().backward()
    assert encoder.table.grad is not None and encoder.table.grad.abs().sum() > 0
    encoder.double()
    assert encoder(x.double()).dtype == torch.float64
    assert "log2_table_size=10" in repr(encoder)


@pytest.mark.skipif(not torch.cuda.is_available() or not C.with_cuda(),
                    reason="needs a CUDA device and nnrt_ext built with its CUDA launchers")
@pytest.mark.parametrize("dim,features,log2_size", [(3, 2, 6), (4, 2, 16), (4, 8, 10)])
def test_cuda_matches_cpu(dim, features, log2_size):
    x, table, _ = random_case(dim, 4, log2_size, features, 3000, torch.float64)
    x[0], x[1], x[2], x[3] = -0.5, 0.0, 1.0, 1.5  # clamped, boundary, boundary, clamped
    grad_out = torch.randn(3000, 4 * features, dtype=torch.float64)
    cpu = encode_with_grads(lambda p, t: hash_encode(p, t, 2, 48), x, table, grad_out)
    gpu = encode_with_grads(lambda p, t: hash_encode(p, t, 2, 48), x.cuda(), table.cuda(),
                            grad_out.cuda())
    for name, a, b in zip(("output", "input gradient", "table gradient"), cpu, gpu):
        assert_close(b.cpu(), a, atol=1e-10, rtol=1e-10, what=name)
