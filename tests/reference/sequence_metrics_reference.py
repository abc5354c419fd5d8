"""An independent, brute-force implementation of the sequence scores (utils/sequence_metrics.py)
for small meshes: all pairwise distances for nearest neighbours, and the closest point on every
triangle by its Voronoi regions (vertex, edge, face) for the distance to the true surface.
Written from the definitions in issue 14, sharing no code with the scorer."""
import numpy as np


def nearest(points, queries):
    """(Q,) distance to and (Q,) index of the nearest of `points` for each query."""
    d = np.sqrt(((queries[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    index = d.argmin(axis=1)
    return d[np.arange(len(queries)), index], index


def closest_on_triangles(p, a, b, c):
    """Closest point to each query p (Q, 3) on each triangle (a, b, c) (F, 3): (Q, F, 3)."""
    p = p[:, None, :]
    a, b, c = a[None], b[None], c[None]
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    shape = np.broadcast_shapes(p.shape, a.shape)
    out = np.zeros(shape)
    done = np.zeros(shape[:2], bool)

    def put(mask, value):
        mask = mask & ~done
        out[mask] = np.broadcast_to(value, shape)[mask]
        done[mask] = True

    with np.errstate(divide="ignore", invalid="ignore"):
        put((d1 <= 0) & (d2 <= 0), a)                                         # vertex a
        put((d3 >= 0) & (d4 <= d3), b)                                        # vertex b
        put((d6 >= 0) & (d5 <= d6), c)                                        # vertex c
        v = d1 / (d1 - d3)
        put((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + v[..., None] * ab)        # edge ab
        w = d2 / (d2 - d6)
        put((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + w[..., None] * ac)        # edge ac
        w = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        put((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0), b + w[..., None] * (c - b))   # edge bc
        denom = 1.0 / (va + vb + vc)
        v, w = vb * denom, vc * denom
        put(np.ones_like(done), a + v[..., None] * ab + w[..., None] * ac)   # inside the face
    return out


def surface_distance(vertices, faces, queries):
    closest = closest_on_triangles(queries, vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]])
    return np.sqrt(((closest - queries[:, None, :]) ** 2).sum(-1)).min(axis=1)


def score(faces, truth, visible, reconstruction, threshold=0.01, frame_ids=None):
    """Dict of the sequence scores in metres (completeness a share) and per-frame lists;
    frame_ids: the frames' numbers, the drift's abscissa (default 0..T-1)."""
    frames = truth.shape[0]
    seen = np.flatnonzero(visible[0])
    distance, match = nearest(reconstruction[0], truth[0, seen])
    pairs = [(i, j) for i, j, d in zip(seen, match, distance) if d <= threshold]
    deformation, accuracy, completeness, chamfer, seen_now, hidden_now = [], [], [], [], [], []
    for t in range(frames):
        deformation.append(np.mean([np.linalg.norm(reconstruction[t, j] - truth[t, i]) for i, j in pairs])
                           if pairs else np.nan)
        seen_pairs = [(i, j) for i, j in pairs if visible[t, i]]
        hidden_pairs = [(i, j) for i, j in pairs if not visible[t, i]]
        seen_now.append(np.mean([np.linalg.norm(reconstruction[t, j] - truth[t, i]) for i, j in seen_pairs])
                        if seen_pairs else np.nan)
        hidden_now.append(np.mean([np.linalg.norm(reconstruction[t, j] - truth[t, i]) for i, j in hidden_pairs])
                          if hidden_pairs else np.nan)
        acc = surface_distance(truth[t], faces, reconstruction[t]).mean()
        accuracy.append(acc)
        targets = truth[t][visible[t]]
        d, _ = nearest(reconstruction[t], targets)
        completeness.append(np.mean(d <= threshold))
        chamfer.append((acc + d.mean()) / 2)
    x = np.arange(frames, dtype=np.float64) if frame_ids is None else np.asarray(frame_ids, np.float64)
    y = np.array(deformation)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum() if frames > 1 else np.nan
    return {"deformation_error": float(np.mean(deformation)), "deformation_error_last": float(deformation[-1]),
            "drift": float(slope), "accuracy": float(np.mean(accuracy)),
            "completeness": float(np.mean(completeness)), "chamfer": float(np.mean(chamfer)),
            "matched": len(pairs), "per_frame_deformation": deformation, "per_frame_accuracy": accuracy,
            "per_frame_seen": seen_now, "per_frame_hidden": hidden_now}
