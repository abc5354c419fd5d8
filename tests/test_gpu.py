"""CUDA against CPU: every op with a CUDA launcher, a prediction run and training steps.

Run with `make gpu-test` on a machine with a GPU and a CUDA build of nnrt_ext. Everywhere else
these tests are skipped with the reason (`make test` shows them as skipped), never passed.

Each op is run on the same inputs on the CPU and on CUDA, in float32 and float64, and outputs and
gradients are compared; the float64 CPU result is the reference. Tolerances: float64 to 1e-9
relative (both devices do the same arithmetic; only the order of a few sums differs), float32 to
what its 24-bit mantissa allows after sums of a few hundred terms.
"""
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import image_proc
from model import solver as gn
from model.ext import C as nnrt_ext
from model.ext import cuda_unavailable_reason
from model.hashgrid import hash_encode
from model.warp import left_rotate, so3_exp
from options import SolverOptions
from tests.conftest import REPO, assert_close, small_synthetic_split
from tests.test_fusion import INTRINSICS as FUSION_INTRINSICS
from tests.test_fusion import random_scene
from tests.solver_problems import make_problem, to_solver_problem
from tests.test_solver import random_match_inputs

# NNRT_GPU_TEST_DEVICE=cpu runs the same comparisons CPU against CPU: a check of this module's own
# code on a machine without a GPU (it proves nothing about CUDA).
DEVICE = os.environ.get("NNRT_GPU_TEST_DEVICE", "cuda")
_REASON = cuda_unavailable_reason() if DEVICE == "cuda" else ""
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=f"no usable CUDA: {_REASON}")]

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-9, rtol=1e-9)}


def _both(fn, *inputs, grad=False):
    """fn on CPU and on CUDA copies of `inputs`: (outputs, input gradients) for each device.

    With grad, floating inputs get the gradient of sum(output_i * probe_i), the same random probes
    on both devices."""
    results = []
    for device in ("cpu", DEVICE):
        leaves = [x.detach().to(device).requires_grad_(grad and x.is_floating_point())
                  if torch.is_tensor(x) else x for x in inputs]
        outputs = fn(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = ()
        if grad:
            wrt = [x for x in leaves if torch.is_tensor(x) and x.requires_grad]
            probes = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype).to(device)
                      for i, o in enumerate(outputs)]
            used = [(o, p) for o, p in zip(outputs, probes) if o.requires_grad]
            grads = torch.autograd.grad([o for o, _ in used], wrt, [p for _, p in used], allow_unused=True)
        results.append(([o.detach().cpu() for o in outputs],
                        [None if g is None else g.cpu() for g in grads]))
    return results


def _compare(results, dtype, what):
    (cpu_out, cpu_grad), (gpu_out, gpu_grad) = results
    for i, (a, b) in enumerate(zip(gpu_out, cpu_out)):
        if a.is_floating_point():
            assert_close(a, b, what=f"{what} output {i}", **TOL[dtype])
        else:
            assert torch.equal(a, b), f"{what} output {i} differs"
    for i, (a, b) in enumerate(zip(gpu_grad, cpu_grad)):
        assert (a is None) == (b is None), f"{what}: gradient {i} exists on one device only"
        if a is not None:
            assert_close(a, b, what=f"{what} gradient {i}", **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_image_ops(dtype):
    gen = torch.Generator().manual_seed(0)
    depth = 0.5 + torch.rand(48, 64, generator=gen, dtype=dtype)
    depth[::7, ::5] = 0.0
    depth[10:14, 20:30] = 7.0  # beyond max_depth
    intrinsics = {"fx": 60.0, "fy": 61.0, "cx": 31.5, "cy": 23.5}
    _compare(_both(lambda d: image_proc.backproject_depth(d, intrinsics), depth), dtype, "backproject_depth")
    points = image_proc.backproject_depth(depth, intrinsics)
    results = _both(lambda p: image_proc.depth_boundary_mask(p, radius=2, max_distance=0.05), points)
    _compare(results, dtype, "depth_boundary_mask")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,features,log2_size", [(3, 2, 8), (4, 2, 16), (4, 8, 10)])
def test_hash_encoding(dtype, dim, features, log2_size):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4000, dim, generator=gen, dtype=dtype)
    x[0], x[1], x[2] = -0.5, 1.0, 1.5  # clamped, boundary, clamped
    table = torch.randn(6, 2 ** log2_size, features, generator=gen, dtype=dtype)
    results = _both(lambda p, t: hash_encode(p, t, 2, 96), x, table, grad=True)
    _compare(results, dtype, "hash_encode")


def _random_terms(M, S, B, N, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(M, 3, 6 * S, generator=gen, dtype=dtype)
    r = torch.randn(M, 3, generator=gen, dtype=dtype)
    sample = torch.randint(0, B, (M, 1), generator=gen)
    nodes = sample * N + torch.randint(0, N, (M, S), generator=gen)
    nodes[::5, 0] = -1    # slot 0 unused: the other slots still count
    nodes[1::7, S - 1] = -1
    return J, r, nodes


@pytest.mark.parametrize("dtype", DTYPES)
def test_normal_equation_assembly(dtype):
    J, r, nodes = _random_terms(M=3000, S=4, B=2, N=30, dtype=dtype, seed=2)
    assemble = lambda J, r: gn.assemble_normal_equations(J, r, nodes.to(J.device), 2, 30)  # noqa: E731
    results = _both(assemble, J, r, grad=True)
    _compare(results, dtype, "assemble_normal_equations")
    # On the GPU too: exactly symmetric, and the same bits on every run (no thread-order sums).
    first = assemble(J.to(DEVICE), r.to(DEVICE))
    second = assemble(J.to(DEVICE), r.to(DEVICE))
    assert torch.equal(first[0], first[0].transpose(1, 2)), "A is not exactly symmetric on CUDA"
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "assembly is not deterministic on CUDA"


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_sparse_kernels(dtype):
    J, r, nodes = _random_terms(M=2000, S=4, B=2, N=30, dtype=dtype, seed=3)
    J2, r2, nodes2 = _random_terms(M=200, S=2, B=2, N=30, dtype=dtype, seed=4)
    cpu_pattern = gn.build_block_pattern([nodes, nodes2], 2, 30)
    gpu_pattern = gn.build_block_pattern([nodes.to(DEVICE), nodes2.to(DEVICE)], 2, 30)
    for name in ("block_row", "block_col", "row_start", "col_order", "col_start", "term_blocks",
                 "entry_order", "entry_start", "slot_order", "slot_start"):
        a, b = getattr(cpu_pattern, name), getattr(gpu_pattern, name)
        for x, y in (zip(a, b) if isinstance(a, list) else [(a, b)]):
            assert torch.equal(x, y.cpu()), f"block pattern {name} differs on {DEVICE}"

    def sparse(J, r):
        pattern = cpu_pattern if J.device.type == "cpu" else gpu_pattern
        blocks, b = gn.assemble_block_sparse(J, r, nodes.to(J.device), pattern)
        return blocks, b, gn.block_matvec(pattern, blocks, b), gn.blocks_to_dense(pattern, blocks)

    _compare(_both(sparse, J, r, grad=True), dtype, "block-sparse assembly")
    first = sparse(J.to(DEVICE), r.to(DEVICE))
    second = sparse(J.to(DEVICE), r.to(DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "block sums are not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_assembly_kernel(dtype):
    J, r, nodes = _random_terms(M=2000, S=4, B=2, N=30, dtype=dtype, seed=5)
    J2, r2, nodes2 = _random_terms(M=200, S=2, B=2, N=30, dtype=dtype, seed=6)
    cpu_lists = gn.build_slot_lists([nodes, nodes2], 2, 30)
    gpu_lists = gn.build_slot_lists([nodes.to(DEVICE), nodes2.to(DEVICE)], 2, 30)
    for a, b in zip(cpu_lists.slot_order + cpu_lists.slot_start, gpu_lists.slot_order + gpu_lists.slot_start):
        assert torch.equal(a, b.cpu()), f"slot lists differ on {DEVICE}"

    def dense(J, r):
        lists = cpu_lists if J.device.type == "cpu" else gpu_lists
        return gn.assemble_dense(lists, [(J, r, nodes.to(J.device)), (J2.to(J.device), r2.to(J.device),
                                                                      nodes2.to(J.device))])

    _compare(_both(dense, J, r), dtype, "dense assembly")
    first = dense(J.to(DEVICE), r.to(DEVICE))
    second = dense(J.to(DEVICE), r.to(DEVICE))
    assert torch.equal(first[0], first[0].transpose(1, 2)), "A is not exactly symmetric on CUDA"
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "dense sums are not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_assembly_from_the_match_structure(dtype):
    inputs = [x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x
              for x in random_match_inputs(M=3000, A=4, T=40, seed=11)]
    r, _, structure = gn.match_terms(*inputs, 0.001, 1.0, structure=True)
    anchors, anchor_weights = inputs[1], inputs[2]

    def dense(structure, r):
        lists = gn.build_slot_lists([anchors.to(r.device)], 1, 40)
        return gn.assemble_dense(lists, [(None, r, anchors.to(r.device))], mirror=r.device.type != "cpu",
                                 structures=[(structure, anchor_weights.to(r.device))])

    _compare(_both(dense, structure, r), dtype, "dense assembly from the structure")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_solve(dtype):
    problem = to_solver_problem([make_problem(points_side=16, seed=s, dtype=dtype) for s in (8, 9)])
    options = SolverOptions(iterations=4, robust_loss="cauchy", linear_solver="sparse", cg_tolerance=1e-10)
    on_gpu = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)}
    on_gpu = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in on_gpu.items()}
    cpu = gn.solve(problem, options)
    gpu = gn.solve(dataclasses.replace(problem, **on_gpu), options)
    assert list(gpu.status) == list(cpu.status) and gpu.linear_solver == "sparse"
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-3)
    assert_close(gpu.translations.cpu(), cpu.translations, what="sparse translations", **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_terms(dtype):
    inputs = random_match_inputs(M=500, A=4, T=40, dtype=dtype)

    def fn(x, anchors, anchor_weights, nodes, tp, td, c, K, R, t):
        # Skinning weights, node positions and intrinsics take no gradient (the op refuses them).
        return gn.match_terms(x, anchors, anchor_weights.detach(), nodes.detach(), tp, td, c, K.detach(), R, t,
                              0.001, 1.0, "cauchy", 3.0)

    results = _both(fn, *inputs, grad=True)
    _compare(results, dtype, "match_terms")


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_terms(dtype):
    gen = torch.Generator().manual_seed(7)
    T, E = 40, 300
    nodes = torch.randn(T, 3, generator=gen, dtype=dtype)
    edges = torch.randint(0, T, (E, 2), generator=gen)
    R = so3_exp(0.3 * torch.randn(T, 3, generator=gen, dtype=dtype))
    t = 0.1 * torch.randn(T, 3, generator=gen, dtype=dtype)
    w = 0.5 + torch.rand(E, generator=gen, dtype=dtype)
    fn = lambda edges, w, nodes, R, t: gn.edge_terms(edges[:, 0], edges[:, 1], w, nodes.detach(), R, t, 2.0)  # noqa: E731
    _compare(_both(fn, edges, w, nodes, R, t, grad=True), dtype, "edge_terms")


@pytest.mark.parametrize("dtype", DTYPES)
def test_left_rotate(dtype):
    gen = torch.Generator().manual_seed(8)
    w = torch.cat((1e-5 * torch.randn(20, 3, generator=gen, dtype=dtype),
                   torch.randn(20, 3, generator=gen, dtype=dtype)))
    R = so3_exp(torch.randn(40, 3, generator=gen, dtype=dtype))
    _compare(_both(left_rotate, w, R, grad=True), dtype, "left_rotate")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gauss_newton_step(dtype):
    J1, r1, n1 = _random_terms(M=800, S=4, B=2, N=12, dtype=dtype, seed=5)
    J2, r2, n2 = _random_terms(M=100, S=2, B=2, N=12, dtype=dtype, seed=6)
    diagonal = torch.full((2, 72), 0.5, dtype=dtype)

    def step(J1, r1, J2, r2):
        return gn.gauss_newton_step(diagonal.to(J1.device), 2, 12, J1, r1, n1.to(J1.device),
                                    J2, r2, n2.to(J1.device))[0]

    results = _both(step, J1, r1, J2, r2, grad=True)
    _compare(results, dtype, "gauss_newton_step")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gauss_newton_step_from_the_match_structure(dtype):
    """The structure's dense assembly and step backward (csrc AssembleDenseMatchRowBody,
    MatchStepBackwardBody) on both devices, with gradients through match_terms."""
    inputs = [x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x
              for x in random_match_inputs(M=1500, A=4, T=30, seed=12)]

    def step(x, tp, td, c, R, t):
        d = x.device
        anchors, aw, nodes, K = (inputs[i].to(d) for i in (1, 2, 3, 7))
        r, _, structure = gn.match_terms(x, anchors, aw, nodes, tp, td, c, K, R, t, 0.001, 1.0,
                                         structure=True, jacobian=False)
        diagonal = torch.full((1, 180), 0.5, dtype=x.dtype, device=d)
        return gn.gauss_newton_step(diagonal, 1, 30, structure, r, anchors, skinning=[aw])[0]

    _compare(_both(step, *(inputs[i] for i in (0, 4, 5, 6, 8, 9)), grad=True), dtype, "structured step")


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_solve(dtype):
    problem = to_solver_problem([make_problem(points_side=16, seed=s, dtype=dtype) for s in (8, 9)])
    options = SolverOptions(iterations=5, robust_loss="cauchy")
    cpu = gn.solve(problem, options)
    on_gpu = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)}
    on_gpu = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in on_gpu.items()}
    gpu = gn.solve(dataclasses.replace(problem, **on_gpu), options)
    assert list(gpu.status) == list(cpu.status)
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-3)
    assert_close(gpu.rotations.cpu(), cpu.rotations, what="rotations", **tol)
    assert_close(gpu.translations.cpu(), cpu.translations, what="translations", **tol)


@pytest.mark.parametrize("dual", [False, True])
def test_warped_integration(dual):
    """The fusion kernel (float32 only) on CUDA against the CPU, two frames into the same blocks."""
    volume, depth, image, mask, nodes, rotations, translations = random_scene(7)
    candidates = volume.candidates(nodes, 12)
    inputs = (volume.keys, torch.arange(volume.num_blocks), candidates, nodes, rotations, translations, depth,
              image, mask)
    params = (volume.voxel_size, volume.truncation, 2.0, FUSION_INTRINSICS["fx"], FUSION_INTRINSICS["fy"],
              FUSION_INTRINSICS["cx"], FUSION_INTRINSICS["cy"], 0.05, 0.1, 4, dual)
    states = {}
    for device in ("cpu", DEVICE):
        state = [t.clone().to(device) for t in (volume.tsdf, volume.weight, volume.color)]
        for _ in range(2):
            nnrt_ext.integrate_warped(*state, *[x.to(device) for x in inputs], *params)
        states[device] = [t.cpu() for t in state]
    assert int((states["cpu"][1] > 0).sum()) > 1000
    for name, a, b in zip(("tsdf", "weight", "color"), states["cpu"], states[DEVICE]):
        assert_close(b, a, what=name, atol=1e-3 if name == "color" else 1e-5, rtol=1e-5)


def _run(*args):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _epe(output: str) -> float:
    return float(re.search(r"EPE 3D \(mm\): ([0-9.]+)", output).group(1))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return small_synthetic_split(tmp_path_factory, "gpu_split", pairs=6, seed=41)


@pytest.mark.parametrize("flow", ["dis", "network"])
def test_generate_on_cuda_scores_like_cpu(split, tmp_path, flow):
    scores = {}
    for name, device in (("cpu", "cpu"), ("cuda", DEVICE)):
        out = str(tmp_path / name)
        _run("generate.py", "--dataset-dir", split, "--split", "test", "--out", out, "--flow", flow,
             "--device", device, "--quiet")
        scores[name] = _epe(_run("evaluate.py", "--dataset-dir", split, "--split", "test",
                                   "--predictions", out, "--quiet"))
    # Same matches on both (the match subsample is drawn on the CPU); float32 sums in another
    # order move the figure by far less than 1%.
    assert abs(scores["cuda"] - scores["cpu"]) <= 0.01 * scores["cpu"] + 0.05, scores


def test_training_steps_of_every_stage_on_cuda(tmp_path_factory, tmp_path):
    from dataset.synthetic import generate
    from options import SyntheticOptions

    root = str(tmp_path_factory.mktemp("gpu_train"))
    generate(root, "train", 4, 43, SyntheticOptions(width=320, height=240), progress=False)
    generate(root, "val", 2, 44, SyntheticOptions(width=320, height=240), progress=False)
    ws = str(tmp_path / "ws")
    init = []
    for stage in ("0_flow", "1_solver", "2_mask", "3_refine"):
        _run("train.py", "--stage", stage, "--experiment", stage, "--dataset-dir", root, "--workspace", ws,
             "--device", DEVICE, "--max-iterations", "20", "--val-every", "20", "--batch-size", "2",
             "--num-workers", "0", "--val-pairs", "2", *init)
        best = os.path.join(ws, stage, "checkpoints", "best.pt")
        state = torch.load(best, weights_only=True, map_location="cpu")
        assert state["iteration"] == 20
        assert all(np.isfinite(v.float().numpy()).all() for v in state["model"].values())
        init = ["--init", best]
