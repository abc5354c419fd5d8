"""Plain-PyTorch reference of the warped TSDF integration (csrc/fusion/fusion.h).

Slow and obviously right: every voxel of every block as one row of a tensor, the same steps as
the header in the same order (anchors among the block's candidates, Gaussian weights, linear
blend or dual-quaternion warp, nearest-pixel projection, truncated running average).
"""
import torch

R = 8


def voxel_positions(keys, voxel_size):
    """(B, 3) int block keys -> (B, 512, 3) voxel centres, voxel index l.x + 8 l.y + 64 l.z."""
    local = torch.arange(R ** 3)
    offsets = torch.stack((local % R, (local // R) % R, local // (R * R)), dim=1)
    return ((keys.long()[:, None, :] * R + offsets[None]).float() * voxel_size)


def anchors_and_weights(x, candidates, nodes, num_anchors, coverage, max_anchor_distance):
    """x (P, 3); candidates (P, K) node ids (-1 none). Returns anchors (P, A) (-1 none), weights
    (P, A) and ok (P,) bool (an anchor exists and the nearest is within max_anchor_distance)."""
    valid = candidates >= 0
    g = nodes[candidates.clamp(min=0)]
    d2 = ((x[:, None, :] - g) ** 2).sum(dim=-1)
    d2 = torch.where(valid, d2, torch.full_like(d2, float("inf")))
    A = min(num_anchors, candidates.shape[1])
    # Stable sort: ties keep the earlier candidate, as the header's insertion does.
    order = torch.sort(d2, dim=1, stable=True).indices[:, :A]
    best = d2.gather(1, order)
    anchors = torch.where(torch.isfinite(best), candidates.gather(1, order), torch.full_like(order, -1))
    w = torch.where(torch.isfinite(best), torch.exp(-best / (2 * coverage ** 2)), torch.zeros_like(best))
    total = w.sum(dim=1, keepdim=True)
    ok = torch.isfinite(best[:, 0]) & (best[:, 0] <= max_anchor_distance ** 2) & (total[:, 0] > 0)
    return anchors, w / total.clamp(min=1e-30), ok


def quaternion_from_matrix(Rm):
    """(P, 3, 3) -> (P, 4) (w, x, y, z), the same four branches as the header, chosen per row."""
    m = Rm.reshape(-1, 9)
    r0, r1, r2, r3, r4, r5, r6, r7, r8 = m.unbind(dim=1)
    trace = r0 + r4 + r8

    def branch(radicand, make):
        s = torch.sqrt(radicand.clamp(min=1e-12)) * 2
        return torch.stack(make(s), dim=1)

    q_trace = branch(trace + 1, lambda s: (0.25 * s, (r7 - r5) / s, (r2 - r6) / s, (r3 - r1) / s))
    q_x = branch(1 + r0 - r4 - r8, lambda s: ((r7 - r5) / s, 0.25 * s, (r1 + r3) / s, (r2 + r6) / s))
    q_y = branch(1 + r4 - r0 - r8, lambda s: ((r2 - r6) / s, (r1 + r3) / s, 0.25 * s, (r5 + r7) / s))
    q_z = branch(1 + r8 - r0 - r4, lambda s: ((r3 - r1) / s, (r2 + r6) / s, (r5 + r7) / s, 0.25 * s))
    use_x = ((r0 > r4) & (r0 > r8))[:, None]
    use_y = (r4 > r8)[:, None]
    return torch.where((trace > 0)[:, None], q_trace,
                       torch.where(use_x, q_x, torch.where(use_y, q_y, q_z)))


def qmul(a, b):
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack((aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw), -1)


def warp(x, anchors, w, nodes, rotations, translations, dual_quaternion):
    a = anchors.clamp(min=0)
    w = torch.where(anchors >= 0, w, torch.zeros_like(w))
    g, Rk, t = nodes[a], rotations[a], translations[a]
    if not dual_quaternion:
        # sum_k w_k (R_k (x - g_k) + g_k + t_k), written as x plus the blended displacement
        # (R_k - I)(x - g_k) + t_k, as the header does (identity motion -> x exactly).
        d = x[:, None, :] - g
        displacement = torch.einsum("pkij,pkj->pki", Rk, d) - d + t
        return x + (w[..., None] * displacement).sum(dim=1)
    P, A = a.shape
    q = quaternion_from_matrix(Rk.reshape(-1, 3, 3)).reshape(P, A, 4)
    sign = torch.where((q * q[:, :1]).sum(-1) < 0, -1.0, 1.0)
    T = torch.cat((torch.zeros(P, A, 1), g + t - torch.einsum("pkij,pkj->pki", Rk, g)), dim=-1)
    real = (sign * w)[..., None] * q
    dual = (sign * w)[..., None] * 0.5 * qmul(T, q)
    real, dual = real.sum(1), dual.sum(1)
    norm = real.norm(dim=1, keepdim=True)
    real, dual = real / norm, dual / norm
    a_, b, c, e = real.unbind(-1)
    Rb = torch.stack((1 - 2 * (c * c + e * e), 2 * (b * c - a_ * e), 2 * (b * e + a_ * c),
                      2 * (b * c + a_ * e), 1 - 2 * (b * b + e * e), 2 * (c * e - a_ * b),
                      2 * (b * e - a_ * c), 2 * (c * e + a_ * b), 1 - 2 * (b * b + c * c)), -1).reshape(P, 3, 3)
    conj = real * torch.tensor([1.0, -1.0, -1.0, -1.0])
    trans = 2 * qmul(dual, conj)[:, 1:]
    return torch.einsum("pij,pj->pi", Rb, x) + trans


def integrate_warped_reference(tsdf, weight, color, keys, slots, candidates, nodes, rotations,
                               translations, depth, image, mask, voxel_size, truncation, weight_cap,
                               fx, fy, cx, cy, coverage, max_anchor_distance, num_anchors,
                               dual_quaternion=False):
    """Same arguments and in-place effect as nnrt_ext.integrate_warped (float32, CPU)."""
    B = keys.shape[0]
    if B == 0:
        return
    x = voxel_positions(keys, voxel_size).reshape(-1, 3)
    cand = candidates.repeat_interleave(R ** 3, dim=0)
    anchors, w, ok = anchors_and_weights(x, cand, nodes, num_anchors, coverage, max_anchor_distance)
    y = warp(x, anchors, w, nodes, rotations, translations, dual_quaternion)
    H, W = depth.shape
    z = y[:, 2]
    u = fx * y[:, 0] / z + cx
    v = fy * y[:, 1] / z + cy
    ok &= (z > 0) & (u >= -0.5) & (u < W - 0.5) & (v >= -0.5) & (v < H - 0.5)
    ui = torch.floor(u + 0.5).long().clamp(0, W - 1)
    vi = torch.floor(v + 0.5).long().clamp(0, H - 1)
    d = depth[vi, ui]
    ok &= (d > 0) & mask[vi, ui]
    sdf = d - z
    ok &= sdf >= -truncation
    value = torch.clamp(sdf / truncation, max=1.0)
    index = (slots[:, None] * R ** 3 + torch.arange(R ** 3)[None]).reshape(-1)[ok]
    flat_t, flat_w, flat_c = tsdf.view(-1), weight.view(-1), color.view(-1, 3)
    old = flat_w[index]
    flat_t[index] = (flat_t[index] * old + value[ok]) / (old + 1)
    flat_c[index] = (flat_c[index] * old[:, None] + image[vi[ok], ui[ok]]) / (old[:, None] + 1)
    flat_w[index] = torch.clamp(old + 1, max=weight_cap)
