"""The fusion loop on small sequences made here (160x120, a few frames): an oracle run meets the
bars at small scale, the exported meshes share one topology without NaN, an interrupted run
resumed gives the same mesh, a failed solve is reported and skipped, and fuse.py answers bad
input with one line."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset import io
from dataset.synthetic.geometry import raycasting_scene
from fusion.sequence import Sequence
from options import FusionOptions, SolverOptions, TrackerOptions
from model.tracker import Tracker
from utils.fusion_run import SOLVER_DEFAULTS, TRACKER_DEFAULTS, build_parser, run_fusion
from utils.fusion_viz import show_sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 120, 160
INTRINSICS = {"fx": 140.0, "fy": 140.0, "cx": 79.5, "cy": 59.5}


def sheet(n=40, size=0.3):
    """A square sheet mesh (n x n vertices) in its own frame, z = 0."""
    u = np.linspace(-size / 2, size / 2, n)
    xs, ys = np.meshgrid(u, u)
    vertices = np.stack((xs, ys, np.zeros_like(xs)), axis=-1).reshape(-1, 3)
    ids = np.arange(n * n).reshape(n, n)
    a, b, c, d = ids[:-1, :-1], ids[:-1, 1:], ids[1:, :-1], ids[1:, 1:]
    faces = np.concatenate((np.stack((a, c, b), -1).reshape(-1, 3), np.stack((b, c, d), -1).reshape(-1, 3)))
    return vertices, faces


def texture(vertices):
    """A checker-and-stripes colour per vertex, so that flow has something to follow."""
    x, y = vertices[:, 0], vertices[:, 1]
    checker = ((np.floor(x / 0.03) + np.floor(y / 0.03)) % 2)
    return np.stack((0.3 + 0.6 * checker, 0.5 + 0.4 * np.sin(40 * x), 0.5 + 0.4 * np.cos(33 * y)), -1)


def deform(vertices, t, frames, static=False):
    """The sheet bent and turning a little in frame t, 0.7 m in front of the camera."""
    if static:
        s = 0.0
    else:
        s = t / max(frames - 1, 1)
    x, y, z = vertices.T
    bend = 0.06 * s * (x / 0.15) ** 2
    angle = 0.25 * s
    xr = np.cos(angle) * x + np.sin(angle) * (z + bend)
    zr = -np.sin(angle) * x + np.cos(angle) * (z + bend)
    return np.stack((xr + 0.01 * s, y - 0.005 * s, zr + 0.7), axis=-1).astype(np.float32)


def render_frame(vertices, faces, colors):
    import open3d.core as o3c

    from fusion.render import pixel_rays
    scene = raycasting_scene(vertices, faces)
    hit = scene.cast_rays(o3c.Tensor(pixel_rays(INTRINSICS, H, W)))
    t = hit["t_hit"].numpy()
    ids = hit["primitive_ids"].numpy().astype(np.int64)
    uv = hit["primitive_uvs"].numpy()
    valid = np.isfinite(t)
    tri = faces[np.where(valid, ids, 0)]
    b = np.stack((1 - uv[..., 0] - uv[..., 1], uv[..., 0], uv[..., 1]), -1)[..., None]
    rgb = (b * colors[tri]).sum(-2)
    background_depth = 1.1
    depth = np.where(valid, t, background_depth).astype(np.float32)
    ys, xs = np.mgrid[0:H, 0:W]
    background = np.stack((0.2 + 0.1 * ((xs // 8 + ys // 8) % 2), 0.25 + 0 * xs, 0.3 + 0 * xs), -1)
    color = np.where(valid[..., None], rgb, background)
    # Which vertices are seen: their depth agrees with the rendered depth at their pixel.
    z = vertices[:, 2]
    u = np.round(INTRINSICS["fx"] * vertices[:, 0] / z + INTRINSICS["cx"]).astype(int)
    v = np.round(INTRINSICS["fy"] * vertices[:, 1] / z + INTRINSICS["cy"]).astype(int)
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    visible = inside & (np.abs(depth[v.clip(0, H - 1), u.clip(0, W - 1)] - z) < 0.005)
    return depth, (color * 255).astype(np.uint8), valid, visible


def make_sequence(root, frames=6, static=False):
    for sub in ("color", "depth", "mask", "gt"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    base, faces = sheet()
    colors = texture(base)
    all_vertices, all_visible = [], []
    for t in range(frames):
        vertices = deform(base, t, frames, static)
        depth, color, valid, visible = render_frame(vertices, faces, colors)
        io.write_depth(os.path.join(root, "depth", f"{t:06d}.png"), depth)
        io.write_color(os.path.join(root, "color", f"{t:06d}.jpg"), color, quality=98)
        io.write_mask(os.path.join(root, "mask", f"{t:06d}_sheet.png"), valid)
        all_vertices.append(vertices)
        all_visible.append(visible)
    io.write_intrinsics(os.path.join(root, "intrinsics.txt"), INTRINSICS)
    np.savez(os.path.join(root, "gt", "gt.npz"), faces=faces.astype(np.int32),
             vertices=np.stack(all_vertices), visible=np.stack(all_visible))
    return np.stack(all_vertices), faces


def fusion_options(root, out, **kw):
    defaults = dict(sequence=root, out=out, voxel_size=0.005, truncation=0.02, node_coverage=0.05,
                    video=False, save_every=2)
    defaults.update(kw)
    return FusionOptions(**defaults)


def solver_options():
    return SolverOptions(**SOLVER_DEFAULTS)


def read_ply_vertices(path):
    import open3d as o3d
    mesh = o3d.io.read_triangle_mesh(path)
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles)


def mean_surface_distance(points, surface, faces):
    """Mean distance of points to a triangle mesh (Open3D's exact point-to-triangle query)."""
    import open3d.core as o3c
    scene = raycasting_scene(surface, faces)
    return scene.compute_distance(o3c.Tensor(points.astype(np.float32))).numpy()


@pytest.fixture(scope="module")
def sequence_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fusion") / "seq")
    vertices, faces = make_sequence(root, frames=6)
    return root, vertices, faces


def test_oracle_motion_meets_the_bars_at_small_scale(sequence_dir, tmp_path):
    root, vertices, faces = sequence_dir
    out = str(tmp_path / "oracle")
    fusion = run_fusion(fusion_options(root, out, oracle_motion=True, deepdeform_names=True), solver_options(),
                        None, progress=False, log=lambda *_: None)
    canonical, canonical_faces = read_ply_vertices(os.path.join(out, "canonical.ply"))
    error = mean_surface_distance(canonical, vertices[0], faces)
    assert error.mean() < 0.005, f"canonical mesh {error.mean() * 1000:.2f} mm from the true surface"
    for t, frame_id in enumerate(fusion.frame_ids):
        live, live_faces = read_ply_vertices(os.path.join(out, "frames", f"{frame_id:06d}.ply"))
        assert live.shape == canonical.shape and np.array_equal(live_faces, canonical_faces)
        assert np.isfinite(live).all()
        assert mean_surface_distance(live, vertices[t], faces).mean() < 0.005
    nodes = np.load(os.path.join(out, "nodes.npz"))
    T, N = len(fusion.frame_ids), nodes["positions"].shape[0]
    assert nodes["rotations"].shape == (T, N, 3, 3) and nodes["translations"].shape == (T, N, 3)
    assert nodes["vertex_anchors"].shape[0] == canonical.shape[0] and nodes["created"].shape == (N,)
    assert list(nodes["status"]) == ["first"] + ["oracle"] * (T - 1)
    with open(os.path.join(out, "frames.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["frame"]) for r in rows] == fusion.frame_ids
    assert os.path.isfile(os.path.join(out, "preview.png"))
    assert os.path.isfile(os.path.join(out, "fusion_options.json"))
    # DeepDeform's naming: <seq>_<segmentEnd>_<frame>.ply, the same mesh topology.
    named = sorted(os.listdir(os.path.join(out, "deepdeform")))
    assert named == [f"seq_000100_{i:06d}.ply" for i in fusion.frame_ids]
    # The viewer, headless: a picture per frame and a video.
    written = show_sequence(out, headless=True)
    assert len([n for n in os.listdir(written["pngs"]) if n.endswith(".png")]) == len(fusion.frame_ids)
    assert os.path.getsize(written["video"]) > 0


def test_gt_flow_tracking_follows_the_motion(sequence_dir, tmp_path):
    root, vertices, faces = sequence_dir
    out = str(tmp_path / "gt")
    tracker = Tracker(TrackerOptions(flow="gt"), solver_options())
    fusion = run_fusion(fusion_options(root, out), solver_options(), tracker, progress=False, log=lambda *_: None)
    assert all(s != "failed" for s in (e.status for e in fusion.log))
    last = fusion.frame_ids[-1]
    live, _ = read_ply_vertices(os.path.join(out, "frames", f"{last:06d}.ply"))
    error = mean_surface_distance(live, vertices[-1], faces)
    assert error.mean() < 0.005, f"last frame mesh {error.mean() * 1000:.2f} mm from the true surface"


def test_keyframe_tracking_follows_the_motion(sequence_dir, tmp_path):
    """--tracking keyframe: every frame is matched to the latest keyframe (frames 0, 2, 4) and
    solved from that frame's motion; with exact flow it follows the motion like the model
    mode, and it needs a keyframe interval."""
    from fusion.loop import Fusion
    root, vertices, faces = sequence_dir
    out = str(tmp_path / "keyframe")
    tracker = Tracker(TrackerOptions(flow="gt"), solver_options())
    fusion = run_fusion(fusion_options(root, out, tracking="keyframe", texture_keyframes=2), solver_options(),
                        tracker, progress=False, log=lambda *_: None)
    assert all(s != "failed" for s in (e.status for e in fusion.log))
    assert [index for index, _ in fusion.keyframes] == [0, 2, 4]
    last = fusion.frame_ids[-1]
    live, _ = read_ply_vertices(os.path.join(out, "frames", f"{last:06d}.ply"))
    error = mean_surface_distance(live, vertices[-1], faces)
    assert error.mean() < 0.005, f"last frame mesh {error.mean() * 1000:.2f} mm from the true surface"
    with pytest.raises(ValueError, match="--texture-keyframes"):
        Fusion(Sequence(root, None), fusion_options(root, out, tracking="keyframe", texture_keyframes=0),
               solver_options(), tracker)


def test_run_fusion_runs_a_subclass_of_the_loop(sequence_dir, tmp_path):
    """run_fusion's fusion_class (benchmarks/diagnose_fusion.py's hook): its steps run the frames."""
    from fusion.loop import Fusion
    root, _, _ = sequence_dir
    steps = []

    class Counting(Fusion):
        def step(self, frame):
            steps.append(frame.frame_id)
            return super().step(frame)
    fusion = run_fusion(fusion_options(root, str(tmp_path / "sub"), oracle_motion=True), solver_options(), None,
                        progress=False, log=lambda *_: None, fusion_class=Counting)
    assert isinstance(fusion, Counting) and steps == fusion.frame_ids[1:]


def test_resume_gives_the_same_mesh(sequence_dir, tmp_path):
    root, _, _ = sequence_dir
    tracker = Tracker(TrackerOptions(flow="dis"), solver_options())
    whole = str(tmp_path / "whole")
    run_fusion(fusion_options(root, whole), solver_options(), tracker, progress=False, log=lambda *_: None)
    parts = str(tmp_path / "parts")
    run_fusion(fusion_options(root, parts), solver_options(), tracker, progress=False, stop_after=3,
               log=lambda *_: None)
    assert os.path.isfile(os.path.join(parts, "state.pt")) and not os.path.exists(os.path.join(parts, "canonical.ply"))
    run_fusion(fusion_options(root, parts, resume=True), solver_options(), tracker, progress=False,
               log=lambda *_: None)
    a, fa = read_ply_vertices(os.path.join(whole, "canonical.ply"))
    b, fb = read_ply_vertices(os.path.join(parts, "canonical.ply"))
    assert fa.shape == fb.shape and np.array_equal(fa, fb), (
        f"resumed mesh topology differs: {fa.shape[0]} vs {fb.shape[0]} faces, "
        f"{int((fa != fb).any(axis=1).sum()) if fa.shape == fb.shape else 'n/a'} differ")
    assert np.allclose(a, b, atol=1e-6), f"resumed mesh vertices differ by up to {np.abs(a - b).max():.2e} m"


def test_failed_solve_is_reported_and_skipped(sequence_dir, tmp_path):
    root, _, _ = sequence_dir
    out = str(tmp_path / "failed")
    # A solver that cannot run (more nodes than it accepts) fails every frame after the first.
    solver = SolverOptions(**{**SOLVER_DEFAULTS, "max_nodes": 4, "min_nodes": 4})
    tracker = Tracker(TrackerOptions(flow="gt"), solver)
    fusion = run_fusion(fusion_options(root, out, video=False), solver, tracker, progress=False,
                        log=lambda *_: None)
    assert [e.status for e in fusion.log][1:] == ["failed"] * (len(fusion.frame_ids) - 1)
    R, t = fusion.history()
    assert torch.equal(t[-1], t[0]) and "too many nodes" in fusion.log[1].message


def run_fuse(*args):
    result = subprocess.run([sys.executable, os.path.join(REPO, "fuse.py"), *args], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    return result.returncode, result.stdout, result.stderr


def test_fuse_command_bad_inputs(sequence_dir, tmp_path):
    root, _, _ = sequence_dir
    code, _, err = run_fuse("--sequence", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code != 0 and "missing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_fuse("--sequence", root, "--out", str(tmp_path / "o"), "--object", "cup", "--flow", "dis")
    assert code == 1 and "mask of object 'cup'" in err and "Traceback" not in err
    code, _, err = run_fuse("--sequence", root, "--out", str(tmp_path / "o"), "--frames", "50:60", "--flow", "dis")
    assert code == 1 and "no frame" in err
    code, _, err = run_fuse("--sequence", root, "--out", str(tmp_path / "o"), "--truncation", "0.05",
                            "--flow", "dis")
    assert code == 1 and "--truncation" in err


def test_fuse_defaults_the_dis_front_end_to_normalised_images_and_two_passes():
    """fuse.py's own front-end defaults (TRACKER_DEFAULTS) win over a checkpoint's stored tracker
    options, and a flag wins over both."""
    args = build_parser(None, {"dis_passes": 1, "dis_normalize": 0.0}).parse_args(["--out", "o"])
    assert (args.dis_normalize, args.dis_passes) == (TRACKER_DEFAULTS["dis_normalize"], TRACKER_DEFAULTS["dis_passes"])
    args = build_parser().parse_args(["--out", "o", "--dis-normalize", "0", "--dis-passes", "1"])
    assert (args.dis_normalize, args.dis_passes) == (0.0, 1)


def test_sequence_reads_frames(sequence_dir):
    root, _, _ = sequence_dir
    seq = Sequence(root)
    assert len(seq) == 6 and seq.read(2).frame_id == 2


def test_point_to_plane_associations_measure_the_depth_offset(sequence_dir, tmp_path):
    """The projective associations of the rendered model with the live depth: on the frame the
    model was made from they agree to a fraction of a voxel; moving the live depth 1 cm away
    from the camera moves every residual n . (x - y) by about n . (0, 0, 1 cm) scaled by depth."""
    from fusion.depth_term import pixel_normals
    from fusion.loop import Fusion
    from model import image_proc
    root, _, _ = sequence_dir
    options = fusion_options(root, str(tmp_path / "icp"))
    sequence = Sequence(root)
    fusion = Fusion(sequence, options, solver_options())
    frame = sequence.read(0)
    fusion.first_frame(frame, sequence.first_mask(None, None)[0])
    rendering = fusion.render(fusion.rotations, fusion.translations)
    anchors, weights = fusion._pixel_anchors(rendering.canonical, rendering.mask)
    for shift in (0.0, 0.01):
        depth = torch.from_numpy(np.where(frame.depth > 0, frame.depth + shift, 0).astype(np.float32))
        points = image_proc.backproject_depth(depth, sequence.intrinsics, sequence.max_depth)
        terms = fusion._icp_terms(rendering, anchors, weights, points, pixel_normals(points))
        P = terms["icp_sample"].shape[0]
        assert P > 0.1 * rendering.mask.sum() / options.icp_stride ** 2
        assert (terms["icp_anchors"] >= 0).all() and torch.allclose(terms["icp_target_normals"].norm(dim=1),
                                                                     torch.ones(P), atol=1e-5)
        distance = ((terms["icp_source_points"] - terms["icp_target_points"]) * terms["icp_target_normals"]).sum(1)
        # The live point at the pixel lies on the ray through the rendered point, scaled by depth.
        source = terms["icp_source_points"]
        expected = -shift * (source * terms["icp_target_normals"]).sum(1) / source[:, 2]
        assert (distance - expected).abs().median() < 0.0015, (shift, float((distance - expected).abs().median()))
    # Beyond --icp-max-distance nothing is associated.
    depth = torch.from_numpy(np.where(frame.depth > 0, frame.depth + 2 * options.icp_max_distance, 0).astype(np.float32))
    points = image_proc.backproject_depth(depth, sequence.intrinsics, sequence.max_depth)
    assert fusion._icp_terms(rendering, anchors, weights, points, pixel_normals(points))["icp_sample"].numel() == 0


def _hidden_graph():
    """30 nodes around 0.8 m, their far side (z > 0.82) hidden; matches on the others only."""
    from types import SimpleNamespace

    from fusion.graph import knn
    gen = torch.Generator().manual_seed(0)
    nodes = torch.randn(30, 3, generator=gen) * 0.05 + torch.tensor([0.0, 0.0, 0.8])
    hidden = nodes[:, 2] > 0.82
    assert 3 < int(hidden.sum()) < 20
    seen = torch.nonzero(~hidden).squeeze(1)
    anchors = seen[torch.randint(0, seen.numel(), (400, 4), generator=gen)]
    matches = SimpleNamespace(anchors=anchors, anchor_weights=torch.full((400, 4), 0.25),
                              weights=torch.ones(400))
    ids, _ = knn(nodes, nodes, 5)
    graph = SimpleNamespace(positions=nodes, edges=ids[:, 1:].long(), edge_weights=torch.ones(30, 4))
    return graph, hidden, matches


def _rigid(nodes, rotvec, shift):
    """Rotation (N, 3, 3) and translations (N, 3) of every node under one rigid motion about
    the nodes' centre."""
    from model.warp import so3_exp
    R = so3_exp(torch.tensor(rotvec)).float()
    centre = nodes.mean(dim=0)
    return R.expand(nodes.shape[0], 3, 3).clone(), (nodes - centre) @ R.T + centre + torch.tensor(shift) - nodes


def test_hidden_nodes_follow_the_seen_ones_rigidly():
    """Nodes without match support take the increment their supported neighbours predict: under
    one rigid increment of the seen nodes, the hidden ones get exactly that rigid motion."""
    from types import SimpleNamespace

    from fusion.loop import Fusion
    graph, hidden, matches = _hidden_graph()
    N = graph.positions.shape[0]
    R, expected_t = _rigid(graph.positions, [0.0, 0.2, 0.05], [0.01, -0.02, 0.005])
    dR, dt = R.clone(), expected_t.clone()
    dR[hidden], dt[hidden] = torch.eye(3), 0.0         # what ARAP alone may leave them with
    identity, zero = torch.eye(3).expand(N, 3, 3), torch.zeros(N, 3)
    # The blend alone, and with the ARAP extension after it (fusion/hidden.py) against either
    # shape (the same here: the previous motion is the identity): all exact.
    for iterations, rest in ((0, "canonical"), (10, "canonical"), (10, "previous")):
        fusion = SimpleNamespace(options=FusionOptions(node_coverage=0.05, hidden_rest=rest,
                                                       hidden_arap_iterations=iterations), graph=graph,
                                 hidden_rest=rest, edge_rest=None, hidden_support=2.0)
        R_out, t_out = Fusion._follow_visible(fusion, dR, dt, identity, zero, matches)
        assert torch.allclose(R_out, R, atol=1e-5)
        assert torch.allclose(t_out, expected_t, atol=1e-6)
    # Off below the threshold: nothing changes when every node is supported.
    fusion.hidden_support = 1e-9
    dR2, dt2 = Fusion._follow_visible(fusion, dR, dt, identity, zero, SimpleNamespace(
        anchors=torch.arange(N).repeat(4, 1).T, anchor_weights=torch.full((N, 4), 0.25), weights=torch.ones(N)))
    assert torch.equal(dR2, dR) and torch.equal(dt2, dt)


def test_hidden_rest_canonical_undoes_an_earlier_distortion():
    """The previous motion moved the seen nodes rigidly but left the hidden region bent out of
    shape; with no further motion, ARAP against the canonical shape restores the rigid motion
    there, ARAP against the previous live shape keeps the distortion."""
    from types import SimpleNamespace

    from fusion.loop import Fusion
    from model.warp import so3_exp
    graph, hidden, matches = _hidden_graph()
    N = graph.positions.shape[0]
    rotations, translations = _rigid(graph.positions, [0.1, 0.4, 0.0], [0.02, 0.0, -0.01])
    truth_R, truth_t = rotations.clone(), translations.clone()
    gen = torch.Generator().manual_seed(1)
    bend = so3_exp(torch.randn(int(hidden.sum()), 3, generator=gen) * 0.2).float()
    rotations[hidden] = bend @ rotations[hidden]
    translations[hidden] += torch.randn(int(hidden.sum()), 3, generator=gen) * 0.01
    dR, dt = torch.eye(3).expand(N, 3, 3).clone(), torch.zeros(N, 3)
    errors = {}
    for rest in ("canonical", "previous"):
        fusion = SimpleNamespace(options=FusionOptions(node_coverage=0.05, hidden_rest=rest,
                                                       hidden_arap_iterations=200), graph=graph,
                                 hidden_rest=rest, edge_rest=None, hidden_support=2.0)
        out_R, out_t = Fusion._follow_visible(fusion, dR, dt, rotations, translations, matches)
        assert torch.equal(out_R[~hidden], dR[~hidden]) and torch.equal(out_t[~hidden], dt[~hidden])
        errors[rest] = ((translations + out_t - truth_t)[hidden].norm(dim=1).max(),
                        (out_R @ rotations - truth_R)[hidden].abs().max())
    assert errors["canonical"][0] < 1e-4 and errors["canonical"][1] < 1e-3, errors
    assert errors["previous"][0] > 3e-3, errors


def test_hidden_rest_canonical_keeps_rotations_orthonormal():
    """Frame after frame of motions composed with the canonical-shape extension: the rotations
    stay rotations (recovering an increment with the transpose of a rotation that has rounded
    away from orthonormal would multiply that rounding every frame)."""
    from types import SimpleNamespace

    from fusion.loop import Fusion
    from model.warp import so3_exp
    graph, hidden, matches = _hidden_graph()
    N = graph.positions.shape[0]
    fusion = SimpleNamespace(options=FusionOptions(node_coverage=0.05, hidden_arap_iterations=3), graph=graph,
                             hidden_rest="canonical", edge_rest=None, hidden_support=2.0)
    gen = torch.Generator().manual_seed(2)
    rotations, translations = torch.eye(3).expand(N, 3, 3).clone(), torch.zeros(N, 3)
    for _ in range(60):
        dR, dt = _rigid(graph.positions + translations, (torch.randn(3, generator=gen) * 0.05).tolist(), [0.0, 0.0, 0.0])
        dR = so3_exp(torch.randn(N, 3, generator=gen) * 0.02).float() @ dR
        dR, dt = Fusion._follow_visible(fusion, dR, dt, rotations, translations, matches)
        rotations, translations = dR @ rotations, translations + dt
    gram = rotations.transpose(1, 2) @ rotations
    assert (gram - torch.eye(3)).abs().max() < 1e-4, (gram - torch.eye(3)).abs().max()


class ShortFlow:
    """The ground-truth front-end measuring every motion `scale` short, as DIS does on weak
    texture (BENCHMARKS.md, fusion section)."""

    def __init__(self, tracker, scale):
        self.tracker, self.options, self.scale = tracker, tracker.options, scale

    def __call__(self, batch, run_solver):
        batch = dict(batch, optical_flow=batch["optical_flow"] * self.scale)
        return self.tracker(batch, run_solver=run_solver)


def test_second_pass_tracks_the_remainder_of_a_short_flow(sequence_dir, tmp_path):
    """A flow that measures every motion half short leaves the nodes about half the (tangential)
    motion behind after one pass; each later pass renders the model at the solved motion and
    tracks part of the rest (less than the flow's half: the regularisers hold some back), so 3
    passes leave clearly less."""
    from fusion.gt import GroundTruth
    from fusion.loop import Fusion
    root, _, _ = sequence_dir
    sequence = Sequence(root, "0:6:5")          # frames 0 and 5: the whole motion in one step
    tracker = ShortFlow(Tracker(TrackerOptions(flow="gt"), solver_options()), 0.5)
    gt = GroundTruth(root, 0)
    errors = {}
    for passes in (1, 3):
        fusion = Fusion(sequence, fusion_options(root, str(tmp_path / str(passes)), passes=passes),
                        solver_options(), tracker, gt)
        fusion.first_frame(sequence.read(0), sequence.first_mask(None, None)[0])
        entry = fusion.step(sequence.read(1))
        assert entry.status != "failed" and entry.steps["flow"] > 0
        _, expected = gt.node_motions(fusion.graph.positions, 5, fusion.options.node_coverage)
        seen = fusion.graph.created == 0
        errors[passes] = float((fusion.translations - expected)[seen].norm(dim=1).median())
    motion = float(expected[seen].norm(dim=1).median())
    assert errors[1] > 0.2 * motion, (errors, motion)
    assert errors[3] < 0.7 * errors[1], (errors, motion)   # measured: 7.7 -> 4.9 mm


def test_hidden_rest_seen_keeps_the_seen_edges_through_a_resume(sequence_dir, tmp_path):
    """--hidden-rest seen: after a few frames the store holds both directions of the edges the
    solves saw well, R_i^T (p_j - p_i) of the last such frame, and the state round trip keeps it."""
    from fusion.hidden import EDGE_KEY, lookup_edge_rest
    from fusion.loop import Fusion
    root, _, _ = sequence_dir
    sequence = Sequence(root, "0:4")
    options = fusion_options(root, str(tmp_path / "seen"), hidden_rest="seen", rest_support=1.0,
                             rest_smoothing=1.0)
    fusion = Fusion(sequence, options, solver_options(), Tracker(TrackerOptions(flow="dis"), solver_options()))
    fusion.first_frame(sequence.read(0), sequence.first_mask(None, None)[0])
    for index in range(1, len(sequence)):
        assert fusion.step(sequence.read(index)).status != "failed"
    keys, vectors, frames = fusion.edge_rest
    # Stamped with the tracked frame that saw them (frame 0 stores none: it has no solve).
    assert int(frames.min()) >= 1 and int(frames.max()) == len(sequence) - 1
    assert keys.numel() > 0 and torch.equal(keys, torch.unique(keys))
    i, j = keys // EDGE_KEY, keys % EDGE_KEY
    assert bool(torch.isin(j * EDGE_KEY + i, keys).all())                 # both directions
    p = fusion.graph.positions + fusion.translations
    now = torch.einsum("eba,eb->ea", fusion.rotations[i], p[j] - p[i])
    # Edges seen in the last frame hold its shape (most of a small, fully visible sheet).
    assert float(((vectors - now).norm(dim=1) < 1e-6).float().mean()) > 0.5
    other = Fusion(sequence, options, solver_options(), None)
    other.load_state_dict(fusion.state_dict())
    assert len(other.edge_rest) == 3 and all(torch.equal(a, b) for a, b in zip(other.edge_rest, fusion.edge_rest))
    assert torch.equal(lookup_edge_rest(other.edge_rest, i, j, torch.zeros_like(vectors)), vectors)
    # A state written before the store kept its frames loads as seen in its last frame.
    state = fusion.state_dict()
    state["edge_rest"] = (keys, vectors)
    other.load_state_dict(state)
    assert torch.equal(other.edge_rest[2], torch.full_like(keys, len(sequence) - 1))


def test_hidden_rest_auto_and_smoothing_by_front_end(sequence_dir, tmp_path):
    """auto: the seen rest with every front-end, kept as last seen with exact flow and averaged
    over the frames that saw it with the tracked front-ends; the point-to-plane terms
    re-associated once and a higher hidden-node support with the tracked front-ends; explicit
    choices win."""
    from fusion.loop import (EXACT_HIDDEN_SUPPORT, TRACKED_HIDDEN_SUPPORT, TRACKED_ICP_REASSOCIATE,
                             TRACKED_REST_SMOOTHING, Fusion)
    root, _, _ = sequence_dir
    sequence = Sequence(root, "0:2")
    tracked = ("seen", TRACKED_REST_SMOOTHING, TRACKED_ICP_REASSOCIATE, TRACKED_HIDDEN_SUPPORT)
    for flow, expected in (("gt", ("seen", 1.0, 0, EXACT_HIDDEN_SUPPORT)), ("dis", tracked), (None, tracked)):
        tracker = None if flow is None else Tracker(TrackerOptions(flow=flow), solver_options())
        fusion = Fusion(sequence, fusion_options(root, str(tmp_path / str(flow))), solver_options(), tracker)
        assert fusion.options.hidden_rest == "auto" and fusion.options.rest_smoothing is None
        assert fusion.options.hidden_support is None
        assert (fusion.hidden_rest, fusion.rest_smoothing, fusion.icp_reassociate, fusion.hidden_support) == expected
    explicit = Fusion(sequence, fusion_options(root, str(tmp_path / "x"), hidden_rest="previous", rest_smoothing=0.5,
                                               icp_reassociate=2, hidden_support=5.0),
                      solver_options(), Tracker(TrackerOptions(flow="gt"), solver_options()))
    assert (explicit.hidden_rest, explicit.rest_smoothing, explicit.icp_reassociate,
            explicit.hidden_support) == ("previous", 0.5, 2, 5.0)


def test_reassociated_point_to_plane_terms_follow_the_solved_motion(tmp_path):
    """--icp-reassociate: the point-to-plane associations made again at the motion just solved
    stop holding the model back toward where it started. Frames 0 and 5 of the bending sheet
    (the whole motion in one step, exact flow): the model's vertices (the true frame-0 sheet
    warped by the solved node motions) end closer to their true frame-5 positions (measured:
    mean 3.9 -> 2.6 mm, median 1.6 -> 1.3 mm). Without the term there is nothing to
    re-associate and the option changes nothing."""
    from fusion.graph import warp_with_anchors
    from fusion.gt import GroundTruth
    from fusion.loop import Fusion
    root = str(tmp_path / "seq")
    truth, _ = make_sequence(root, frames=6)
    sequence = Sequence(root, "0:6:5")
    errors = {}
    for weight, rounds in ((300.0, 0), (300.0, 1), (0.0, 0), (0.0, 1)):
        solver = SolverOptions(**{**SOLVER_DEFAULTS, "icp_weight": weight})
        fusion = Fusion(sequence, fusion_options(root, str(tmp_path / f"{weight}_{rounds}"), icp_reassociate=rounds),
                        solver, Tracker(TrackerOptions(flow="gt"), solver), GroundTruth(root, 0))
        fusion.first_frame(sequence.read(0), sequence.first_mask(None, None)[0])
        assert fusion.step(sequence.read(1)).status != "failed"
        start = torch.from_numpy(truth[0])
        anchors, weights = fusion.graph.anchors(start)
        kept = (anchors >= 0).all(dim=1)
        warped = warp_with_anchors(start[kept], anchors[kept], weights[kept], fusion.graph.positions,
                                   fusion.rotations, fusion.translations)
        errors[weight, rounds] = float((warped - torch.from_numpy(truth[5])[kept]).norm(dim=1).mean())
    assert errors[300.0, 1] < 0.8 * errors[300.0, 0], errors
    assert errors[0.0, 1] == errors[0.0, 0], errors


def test_failed_reassociated_solve_keeps_the_first_motion_and_says_so(sequence_dir, tmp_path, monkeypatch):
    """A re-associated solve that fails (here: a node cap it exceeds) leaves the frame with the
    first solve's motion, not failed, and its message says which solve failed and why."""
    import dataclasses

    import fusion.loop as loop
    from fusion.gt import GroundTruth
    root, _, _ = sequence_dir
    sequence = Sequence(root, "0:2")
    solver = solver_options()
    original, motions = loop.solve, {}
    for fail in (False, True):
        calls = []

        def solve(problem, options, generator, fail=fail, calls=calls):
            calls.append(1)
            if fail and len(calls) == 2:
                options = dataclasses.replace(options, max_nodes=1)
            return original(problem, options, generator)

        monkeypatch.setattr(loop, "solve", solve)
        fusion = loop.Fusion(sequence, fusion_options(root, str(tmp_path / str(fail)), icp_reassociate=1), solver,
                             Tracker(TrackerOptions(flow="gt"), solver), GroundTruth(root, 0))
        fusion.first_frame(sequence.read(0), sequence.first_mask(None, None)[0])
        entry = fusion.step(sequence.read(1))
        assert len(calls) == 2 and entry.status != "failed"
        motions[fail] = fusion.translations.clone()
        if fail:
            assert "re-associated solve 1 failed (too many nodes" in entry.message, entry.message
        else:
            assert "re-associated" not in entry.message
    # Without the second solve's update the motion is the first solve's, not the re-solved one.
    assert not torch.allclose(motions[False], motions[True])


def test_diagnosis_node_errors_report_by_support_and_change_nothing(sequence_dir, tmp_path, capsys):
    """benchmarks/diagnose_fusion.py --node-errors K prints the first frame's nodes' errors
    against the generator by match support every K frames, and the run ends as without it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("diagnose_fusion",
                                                  os.path.join(REPO, "benchmarks", "diagnose_fusion.py"))
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    root, _, _ = sequence_dir
    common = ["--sequence", root, "--flow", "gt", "--quiet", "--no-video", "--threads", "1",
              "--voxel-size", "0.005", "--truncation", "0.02"]
    printed = {}
    for every in (0, 2):
        out = str(tmp_path / f"every{every}")
        assert diagnose.main(common + ["--out", out, "--node-errors", str(every)]) == 0
        printed[every] = capsys.readouterr().out
    lines = [line for line in printed[2].splitlines() if "node error (mm) by match support" in line]
    assert [line.split(":")[0] for line in lines] == ["frame 2", "frame 4"], printed[2]
    assert all("nodes" in line and "(solve " in line for line in lines)
    assert "node error" not in printed[0]
    scores = [[line for line in printed[every].splitlines() if line.startswith("Deformation error")]
              for every in (0, 2)]
    assert scores[0] and scores[0] == scores[1]
    a, fa = read_ply_vertices(os.path.join(tmp_path, "every0", "canonical.ply"))
    b, fb = read_ply_vertices(os.path.join(tmp_path, "every2", "canonical.ply"))
    assert np.array_equal(fa, fb) and np.array_equal(a, b)
