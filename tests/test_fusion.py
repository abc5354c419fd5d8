"""Warped TSDF integration (csrc/fusion) against its plain-PyTorch reference, identity warp
against rigid integration, a static scene's mesh against the true surface, and bad inputs."""
import os

import numpy as np
import pytest
import torch

from dataset import io
from fusion.graph import NodeGraph, blend_motions, inverse_warp, project_to_rotation
from fusion.sequence import Sequence, SequenceError
from fusion.volume import TSDFVolume
from model.ext import C
from model.warp import so3_exp
from tests.reference.fusion_reference import integrate_warped_reference, voxel_positions

INTRINSICS = {"fx": 150.0, "fy": 150.0, "cx": 79.5, "cy": 59.5}
H, W = 120, 160
CENTRE, RADIUS = np.array([0.02, -0.01, 0.6]), 0.12


def sphere_depth(centre=CENTRE, radius=RADIUS, intrinsics=INTRINSICS, height=H, width=W):
    """Depth (H, W) of a sphere by exact ray casting (0 where the ray misses)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    d = np.stack(((xs - intrinsics["cx"]) / intrinsics["fx"], (ys - intrinsics["cy"]) / intrinsics["fy"],
                  np.ones_like(xs)), axis=-1)
    a = (d * d).sum(-1)
    b = -2 * (d @ centre)
    c = centre @ centre - radius ** 2
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    return np.where(disc > 0, t, 0).astype(np.float32)


def sphere_nodes(count=60, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(count, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[:, 2] = -np.abs(v[:, 2])                       # the half facing the camera
    return torch.from_numpy(CENTRE + RADIUS * v).float()


def random_scene(seed=0, blocks_from_depth=True):
    """A volume with blocks around the sphere, nodes on it, small random motions."""
    g = torch.Generator().manual_seed(seed)
    depth = torch.from_numpy(sphere_depth())
    volume = TSDFVolume(0.01, 0.03, 20.0)
    from model import image_proc
    points = image_proc.backproject_depth(depth, INTRINSICS)
    volume.allocate_near(points[points[..., 2] > 0])
    nodes = sphere_nodes(seed=seed)
    N = nodes.shape[0]
    rotations = so3_exp(0.05 * torch.randn(N, 3, generator=g))
    translations = 0.005 * torch.randn(N, 3, generator=g)
    image = 255 * torch.rand(H, W, 3, generator=g)
    mask = torch.rand(H, W, generator=g) > 0.05
    return volume, depth, image, mask, nodes, rotations, translations


def run_both(volume, depth, image, mask, nodes, rotations, translations, dual=False, frames=2):
    candidates = volume.candidates(nodes, 12)
    n = volume.num_blocks
    slots = torch.arange(n)
    ours = [volume.tsdf.clone(), volume.weight.clone(), volume.color.clone()]
    ref = [t.clone() for t in ours]
    args = (volume.keys, slots, candidates, nodes, rotations, translations, depth, image, mask)
    params = (volume.voxel_size, volume.truncation, 2.0, INTRINSICS["fx"], INTRINSICS["fy"], INTRINSICS["cx"],
              INTRINSICS["cy"], 0.05, 0.1, 4, dual)
    for _ in range(frames):
        C.integrate_warped(*ours, *args, *params)
        integrate_warped_reference(*ref, *args, *params)
    return ours, ref


def assert_same(ours, ref, names=("tsdf", "weight", "color")):
    for name, a, b in zip(names, ours, ref):
        diff = (a - b).abs()
        where = np.unravel_index(int(diff.argmax()), diff.shape)
        assert torch.allclose(a, b, atol=1e-4 if name == "color" else 1e-5), \
            f"{name}: largest difference {float(diff.max()):.3g} at {where}"


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_reference(seed, dual):
    volume, depth, image, mask, nodes, rotations, translations = random_scene(seed)
    ours, ref = run_both(volume, depth, image, mask, nodes, rotations, translations, dual)
    updated = (ref[1] > 0).sum()
    assert updated > 1000, "the scene must integrate voxels for the comparison to mean anything"
    assert float(ref[1].max()) == 2.0          # the weight cap
    assert_same(ours, ref)


def test_dual_quaternion_equals_linear_blend_for_one_motion():
    """With every node moving by the same rigid motion both blends are that motion."""
    volume, depth, image, mask, nodes, _, _ = random_scene(3)
    N = nodes.shape[0]
    R = so3_exp(torch.tensor([[0.02, -0.03, 0.01]])).expand(N, 3, 3).contiguous()
    t_rigid = torch.tensor([0.004, -0.002, 0.003])
    translations = (R @ nodes[..., None])[..., 0] - nodes + t_rigid     # x -> R x + t_rigid
    linear, _ = run_both(volume, depth, image, mask, nodes, R, translations, dual=False, frames=1)
    dual, _ = run_both(volume, depth, image, mask, nodes, R, translations, dual=True, frames=1)
    assert_same(linear, dual)


def rigid_integration_reference(tsdf, weight, color, keys, slots, depth, image, mask, voxel_size,
                                truncation, weight_cap):
    """Plain rigid projective TSDF integration (no graph), written independently of the warp."""
    x = voxel_positions(keys, voxel_size).reshape(-1, 3)
    u = INTRINSICS["fx"] * x[:, 0] / x[:, 2] + INTRINSICS["cx"]
    v = INTRINSICS["fy"] * x[:, 1] / x[:, 2] + INTRINSICS["cy"]
    ok = (x[:, 2] > 0) & (u >= -0.5) & (u < W - 0.5) & (v >= -0.5) & (v < H - 0.5)
    ui, vi = torch.floor(u + 0.5).long().clamp(0, W - 1), torch.floor(v + 0.5).long().clamp(0, H - 1)
    sdf = depth[vi, ui] - x[:, 2]
    ok &= (depth[vi, ui] > 0) & mask[vi, ui] & (sdf >= -truncation)
    index = (slots[:, None] * 512 + torch.arange(512)).reshape(-1)[ok]
    ft, fw, fc = tsdf.view(-1), weight.view(-1), color.view(-1, 3)
    old = fw[index]
    ft[index] = (ft[index] * old + torch.clamp(sdf[ok] / truncation, max=1)) / (old + 1)
    fc[index] = (fc[index] * old[:, None] + image[vi[ok], ui[ok]]) / (old[:, None] + 1)
    fw[index] = torch.clamp(old + 1, max=weight_cap)


def test_identity_warp_is_rigid_integration():
    volume, depth, image, mask, nodes, _, _ = random_scene(4)
    N = nodes.shape[0]
    identity = (torch.eye(3).repeat(N, 1, 1), torch.zeros(N, 3))
    # Every voxel must have an anchor in range, or the warped path skips it: a large range.
    ours = [volume.tsdf.clone(), volume.weight.clone(), volume.color.clone()]
    rigid = [t.clone() for t in ours]
    slots = torch.arange(volume.num_blocks)
    for _ in range(3):
        C.integrate_warped(*ours, volume.keys, slots, volume.candidates(nodes, 8), nodes, *identity, depth, image,
                           mask, volume.voxel_size, volume.truncation, 64.0, INTRINSICS["fx"], INTRINSICS["fy"],
                           INTRINSICS["cx"], INTRINSICS["cy"], 0.05, 10.0, 4, False)
        rigid_integration_reference(*rigid, volume.keys, slots, depth, image, mask, volume.voxel_size,
                                    volume.truncation, 64.0)
    assert int((rigid[1] > 0).sum()) > 1000
    assert_same(ours, rigid)


def test_static_scene_mesh_within_half_a_voxel():
    """A static, noise-free sphere: the canonical mesh lies on the true surface (mean error
    below half a voxel) and the storage grows with the surface only."""
    depth = torch.from_numpy(sphere_depth())
    voxel = 0.005
    volume = TSDFVolume(voxel, 5 * voxel, 64.0)
    from model import image_proc
    points = image_proc.backproject_depth(depth, INTRINSICS)
    volume.allocate_near(points[points[..., 2] > 0])
    nodes = sphere_nodes(80)
    N = nodes.shape[0]
    image = torch.full((H, W, 3), 128.0)
    for _ in range(3):
        volume.integrate(depth, image, depth > 0, INTRINSICS, nodes, torch.eye(3).repeat(N, 1, 1),
                         torch.zeros(N, 3), coverage=0.05, max_anchor_distance=0.2)
    vertices, faces, colors = volume.extract_mesh(0.5)
    assert faces.shape[0] > 500 and np.isfinite(vertices).all()
    error = np.abs(np.linalg.norm(vertices - CENTRE, axis=1) - RADIUS)
    assert error.mean() < voxel / 2, f"mean distance to the sphere {error.mean() * 1000:.2f} mm"
    assert np.allclose(colors, 128 / 255, atol=1e-3)
    # Sparse: far fewer blocks than the bounding box of the sphere's front half holds.
    bbox_blocks = (np.ceil((2 * RADIUS + 0.05) / volume.block_size) + 1) ** 3
    assert volume.num_blocks < 0.6 * bbox_blocks


def test_mesh_welds_vertices_and_is_independent_of_the_block_order():
    """A TSDF whose zero level passes exactly through voxels (Open3D's marching cubes then emits
    one vertex per cut edge there, several at one position) and a tilted, non-planar one: the
    mesh has one vertex per position, no degenerate face, and is the same whatever order the
    blocks were allocated in (Open3D's vertex order follows its threads and hash slots)."""
    voxel, trunc = 0.01, 0.03
    keys = torch.tensor([[x, y, z] for x in range(-1, 2) for y in range(-1, 2) for z in range(3)], dtype=torch.int32)
    meshes = []
    for order in (torch.arange(keys.shape[0]), torch.randperm(keys.shape[0], generator=torch.Generator().manual_seed(0))):
        volume = TSDFVolume(voxel, trunc, 10.0)
        volume._append(keys[order])
        grid = voxel_positions(volume.keys, voxel).reshape(volume.num_blocks, 8, 8, 8, 3)   # (B, z, y, x, 3)
        flat = (grid[..., 2] - 0.1) / trunc              # zero exactly on the voxel plane z = 0.1
        bump = (grid[..., 2] - 0.12 - 0.3 * grid[..., 0] ** 2 - 0.1 * grid[..., 1]) / trunc
        volume.tsdf[:volume.num_blocks] = torch.where(grid[..., 0] < 0, flat, bump).clamp(-1, 1)
        volume.weight[:volume.num_blocks] = 1.0
        volume.color[:volume.num_blocks] = grid.abs() * 100
        meshes.append(volume.extract_mesh())
    (v, f, c), (v2, f2, c2) = meshes
    assert f.shape[0] > 100
    assert np.unique(v, axis=0).shape[0] == v.shape[0], "vertices at one position were not welded"
    assert ((f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])).all()
    assert np.array_equal(v, v2) and np.array_equal(f, f2) and np.allclose(c, c2)


def test_color_observations_keep_the_first_colours_and_average_the_geometry():
    volume, depth, image, mask, nodes, rotations, translations = random_scene(seed=3)
    twin = TSDFVolume(volume.voxel_size, volume.truncation, volume.weight_cap)
    twin._append(volume.keys.clone())
    frames = [(depth, image), (depth * 1.01, 255 - image), (depth * 0.99, image.flip(0))]
    first = {}
    for k, (d, im) in enumerate(frames):
        for v, observations in ((volume, 0), (twin, 1)):
            v.integrate(d, im, mask, INTRINSICS, nodes, rotations, translations, 0.05, 0.2,
                        color_observations=observations)
        if k == 0:
            first = {"color": twin.color.clone(), "weight": twin.weight.clone()}
    seen = first["weight"] > 0
    assert seen.sum() > 1000
    # The geometry is the same as without the option; colours are those of the first frame.
    assert torch.equal(twin.tsdf, volume.tsdf) and torch.equal(twin.weight, volume.weight)
    assert torch.equal(twin.color[seen], first["color"][seen])
    assert (volume.color[seen] - first["color"][seen]).abs().max() > 10


def test_allocation_covers_the_whole_truncation_band():
    """A truncation band wider than a block spans 3 blocks per axis: all are allocated."""
    volume = TSDFVolume(0.005, 0.025, 10.0)                  # blocks of 4 cm, band of 5 cm
    volume.allocate_near(torch.tensor([[0.0, 0.0, 0.70]]))
    for z in np.arange(0.675, 0.7251, 0.005):
        key = torch.floor(torch.tensor([[0.0, 0.0, z]]) / volume.block_size).to(torch.int32)
        assert int(volume.find(key)[0]) >= 0, f"block of z = {z:.3f} m not allocated"


def test_volume_lookup_and_state_round_trip():
    volume = TSDFVolume(0.01, 0.03, 10.0, capacity=2)
    added = volume.allocate_near(torch.tensor([[0.0, 0.0, 0.5], [0.3, -0.2, 0.7], [-1.0, 2.0, 3.0]]))
    assert added == volume.num_blocks and volume.tsdf.shape[0] >= volume.num_blocks
    assert volume.allocate_near(torch.tensor([[0.0, 0.0, 0.5]])) == 0
    slots = volume.find(volume.keys)
    assert torch.equal(slots, torch.arange(volume.num_blocks))
    assert int(volume.find(torch.tensor([[100, 100, 100]], dtype=torch.int32))[0]) == -1
    volume.tsdf[:volume.num_blocks] = torch.rand(volume.num_blocks, 8, 8, 8)
    other = TSDFVolume(0.01, 0.03, 10.0)
    other.load_state_dict(volume.state_dict())
    assert torch.equal(other.keys, volume.keys)
    assert torch.equal(other.tsdf[:other.num_blocks], volume.tsdf[:volume.num_blocks])


def test_graph_growth_and_blended_motion():
    nodes = torch.tensor([[0.0, 0.0, 0.5], [0.05, 0.0, 0.5], [0.0, 0.05, 0.5], [0.05, 0.05, 0.5]])
    graph = NodeGraph(nodes, torch.tensor([[1, 2, -1], [0, 3, -1], [0, 3, -1], [1, 2, -1]]),
                      torch.full((4, 3), 1 / 3), torch.zeros(4, dtype=torch.int64),
                      torch.zeros(4, dtype=torch.int64), 0.05)
    candidates = torch.tensor([[0.12, 0.0, 0.5], [0.125, 0.01, 0.5], [0.5, 0.5, 0.5], [0.02, 0.02, 0.5]])
    ids = graph.insert(candidates, frame_index=3, max_new=5)
    assert ids.tolist() == [4]                       # only the near, uncovered candidate
    assert graph.created.tolist() == [0, 0, 0, 0, 3] and graph.edges.shape == (5, 3)
    assert (graph.edges[4] >= 0).all() and 4 not in graph.edges[4].tolist()
    # A rigid motion of all nodes is inherited exactly by blending.
    R = so3_exp(torch.tensor([0.1, 0.2, -0.1]))
    T = 2
    rot = R.expand(T, 4, 3, 3)
    trans = ((R @ nodes[..., None])[..., 0] - nodes + torch.tensor([0.01, 0.0, 0.02])).expand(T, 4, 3)
    anchors, weights = torch.tensor([[1, 3, 0, 2]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    new = graph.positions[4:5]
    R_new, t_new = blend_motions(new, anchors, weights, nodes, rot, trans)
    assert torch.allclose(R_new, R.expand(T, 1, 3, 3), atol=1e-5)
    expected = (R @ new[0]) + torch.tensor([0.01, 0.0, 0.02]) - new[0]
    assert torch.allclose(t_new, expected.expand(T, 1, 3), atol=1e-5)
    # inverse_warp undoes the rigid warp.
    live = (R @ candidates[..., None])[..., 0] + torch.tensor([0.01, 0.0, 0.02])
    back = inverse_warp(live, nodes, rot[0].contiguous(), trans[0].contiguous(), 0.05)
    assert torch.allclose(back, candidates, atol=1e-5)
    assert torch.allclose(project_to_rotation(2 * R), R, atol=1e-5)


def test_graph_growth_when_a_new_node_is_nearest_to_a_later_one():
    """Two nodes inserted in one call where the first one's nearest node is the second: its
    cluster comes from the nearest node that already has one (this raised an IndexError)."""
    nodes = torch.tensor([[0.0, 0.0, 0.5], [0.05, 0.0, 0.5], [0.0, 0.05, 0.5], [0.05, 0.05, 0.5]])
    graph = NodeGraph(nodes, torch.tensor([[1, 2, -1], [0, 3, -1], [0, 3, -1], [1, 2, -1]]),
                      torch.full((4, 3), 1 / 3), torch.tensor([0, 0, 1, 1]),
                      torch.zeros(4, dtype=torch.int64), 0.05)
    a, b = [-0.06, 0.0, 0.5], [-0.06, -0.055, 0.5]      # a first (nearer the graph); b nearer to a
    ids = graph.insert(torch.tensor([b, a]), frame_index=1, max_new=5)
    assert ids.tolist() == [4, 5] and torch.allclose(graph.positions[4], torch.tensor(a))
    assert int(graph.edges[4, 0]) == 5                  # a's nearest node is b
    assert graph.clusters.tolist() == [0, 0, 1, 1, 0, 0]


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_kernel_refuses_bad_tensors():
    volume, depth, image, mask, nodes, rotations, translations = random_scene(5)
    cand = volume.candidates(nodes, 8)
    slots = torch.arange(volume.num_blocks)
    base = [volume.tsdf, volume.weight, volume.color, volume.keys, slots, cand, nodes, rotations, translations,
            depth, image, mask]
    params = [0.01, 0.03, 10.0, 150.0, 150.0, 79.5, 59.5, 0.05, 0.1, 4, False]
    cases = [(9, depth.double(), "depth must have dtype"), (12 - 1, mask.float(), "mask must have dtype"),
             (5, cand.clamp(max=nodes.shape[0]) + 1, "candidates must lie in"),
             (4, slots + volume.tsdf.shape[0], "block_slots must lie in"),
             (10, image[:, :5], "image must be (H, W, 3)")]
    for position, value, words in cases:
        args = list(base)
        args[position] = value.contiguous()
        with pytest.raises(RuntimeError, match=words.replace("(", r"\(").replace(")", r"\)")):
            C.integrate_warped(*args, *params)
    with pytest.raises(RuntimeError, match="num_anchors"):
        C.integrate_warped(*base, *params[:-2], 9, False)


def write_sequence(root, frames=2, mask_pixels=True):
    os.makedirs(os.path.join(root, "color"))
    os.makedirs(os.path.join(root, "depth"))
    os.makedirs(os.path.join(root, "mask"))
    depth = sphere_depth()
    for i in range(frames):
        io.write_depth(os.path.join(root, "depth", f"{i:06d}.png"), depth)
        io.write_color(os.path.join(root, "color", f"{i:06d}.jpg"), np.full((H, W, 3), 90, np.uint8))
    io.write_mask(os.path.join(root, "mask", "000000_ball.png"), (depth > 0) if mask_pixels else depth < 0)
    io.write_intrinsics(os.path.join(root, "intrinsics.txt"), INTRINSICS)


def test_sequence_errors_name_the_file(tmp_path):
    with pytest.raises(SequenceError, match="sequence folder not found"):
        Sequence(str(tmp_path / "nope"))
    root = str(tmp_path / "seq")
    write_sequence(root, 3)
    seq = Sequence(root)
    assert seq.frame_ids == [0, 1, 2] and (seq.height, seq.width) == (H, W)
    mask, path = seq.first_mask()
    assert mask.sum() == (sphere_depth() > 0).sum() and path.endswith("000000_ball.png")
    assert Sequence(root, "1:3").frame_ids == [1, 2]
    with pytest.raises(SequenceError, match="no frame"):
        Sequence(root, "7:9")
    os.remove(os.path.join(root, "color", "000001.jpg"))
    with pytest.raises(SequenceError, match="000001.jpg: missing"):
        Sequence(root)
    io.write_color(os.path.join(root, "color", "000001.jpg"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SequenceError, match="000001.jpg: colour is 10x10"):
        Sequence(root).read(1)
    io.write_depth(os.path.join(root, "depth", "000002.png"), np.zeros((H, W)))
    with pytest.raises(SequenceError, match="000002.png: no valid depth"):
        Sequence(root).read(2)
    with pytest.raises(SequenceError, match="mask of object 'cup'"):
        Sequence(root).first_mask(object_name="cup")
    empty = str(tmp_path / "empty")
    write_sequence(empty, 1, mask_pixels=False)
    with pytest.raises(SequenceError, match="the mask is empty"):
        Sequence(empty).first_mask()
