"""csrc/image ops against their references; the crop's principal point."""
import numpy as np
import pytest
import torch

from tests.conftest import assert_close
from tests.reference import image_reference as ref
from model import image_proc
from model.ext import C

INTR = {"fx": 50.0, "fy": 52.0, "cx": 9.5, "cy": 7.25}


def _depth(h=15, w=20, seed=0):
    rng = np.random.default_rng(seed)
    depth = 1.0 + 0.02 * rng.standard_normal((h, w))
    depth[3:6, 4:9] += 0.3                 # a step: long edges
    depth[rng.random((h, w)) < 0.08] = 0   # holes
    depth[0, 0] = np.nan
    depth[1, 1] = 7.0                      # beyond max depth
    return depth


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backproject_matches_reference(dtype):
    depth = _depth()
    out = image_proc.backproject_depth(torch.tensor(depth, dtype=dtype), INTR, 6.0)
    assert out.dtype == dtype
    assert_close(out, ref.backproject(depth, INTR["fx"], INTR["fy"], INTR["cx"], INTR["cy"], 6.0),
                 atol=1e-6, what="points")


def test_mesh_matches_reference():
    points = image_proc.backproject_depth(torch.tensor(_depth(), dtype=torch.float32), INTR, 6.0)
    vertices, pixels, faces = image_proc.mesh_from_depth(points, 0.05)
    v_ref, p_ref, f_ref = ref.mesh(points.double().numpy(), 0.05)
    assert_close(vertices, v_ref, atol=1e-6, what="vertices")
    assert torch.equal(pixels, torch.tensor(p_ref, dtype=torch.int32))
    assert torch.equal(faces, torch.tensor(f_ref, dtype=torch.int32))
    # normals face the camera (negative z): the winding the reference documents
    v = vertices.double()
    normals = torch.cross(v[faces[:, 1].long()] - v[faces[:, 0].long()],
                          v[faces[:, 2].long()] - v[faces[:, 0].long()], dim=1)
    assert (normals[:, 2] < 0).all()


def test_boundary_mask_matches_reference():
    points = image_proc.backproject_depth(torch.tensor(_depth(seed=1), dtype=torch.float32), INTR, 6.0)
    for radius, distance in ((1, 0.1), (2, 0.05)):
        out = image_proc.depth_boundary_mask(points, radius, distance)
        assert torch.equal(out, torch.from_numpy(ref.boundary(points.double().numpy(), radius, distance)))


def test_center_crop_moves_principal_point_by_the_offset_exactly():
    """The reference's crop left cx half a pixel off. A point must project to the same pixel
    of the cropped image as of the full image, minus the crop offset."""
    intr = {"fx": 575.548, "fy": 577.46, "cx": 323.172, "cy": 236.417}
    top, left = image_proc.center_crop_offsets(480, 640, 448, 600)
    assert (top, left) == (16, 20)
    cropped = image_proc.crop_intrinsics(intr, top, left)
    point = torch.tensor([[0.1, -0.2, 1.3]], dtype=torch.float64)
    full = image_proc.project_points(point, intr)
    crop = image_proc.project_points(point, cropped)
    assert_close(crop, full - torch.tensor([[left, top]], dtype=torch.float64), atol=1e-12, what="pixel")
    image = torch.arange(480 * 640).reshape(480, 640)
    assert image_proc.center_crop(image, 448, 600)[0, 0] == image[16, 20]
    with pytest.raises(ValueError, match="does not fit"):
        image_proc.center_crop_offsets(100, 100, 128, 64)


def test_ops_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="2 dimensions"):
        C.backproject_depth(torch.zeros(3, 4, 5), 1.0, 1.0, 0.0, 0.0, 6.0)
    with pytest.raises(RuntimeError, match=r"\(H, W, 3\)"):
        C.mesh_from_depth(torch.zeros(4, 5, 2), 0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    depth = torch.tensor(_depth(), dtype=torch.float32)
    points = image_proc.backproject_depth(depth, INTR)
    assert_close(image_proc.backproject_depth(depth.cuda(), INTR).cpu(), points, atol=1e-6)
    assert torch.equal(image_proc.depth_boundary_mask(points.cuda()).cpu(), image_proc.depth_boundary_mask(points))
