"""ARAP extension of the hidden nodes' motion (fusion/hidden.py): a rigid motion of the seen
nodes extends to the hidden ones exactly whatever their start, the seen rows stay, a hidden
node without an edge path to a seen one keeps its start, and with the edges' last seen shapes
as the rest (--hidden-rest seen) a bend carries on into the hidden part."""
import torch

from fusion.hidden import EDGE_KEY, arap_extension, fade_edge_rest, lookup_edge_rest, update_edge_rest
from fusion.graph import knn


def grid_graph(n=5, spacing=0.05):
    ys, xs, zs = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(2), indexing="ij")
    positions = torch.stack((xs, ys, zs), dim=-1).reshape(-1, 3).double() * spacing
    ids, distances = knn(positions.float(), positions.float(), 7)
    edges = ids[:, 1:].long()
    weights = torch.exp(-distances[:, 1:] ** 2 / (2 * spacing ** 2)).float()
    return positions, edges, weights


def rotation(axis, angle):
    axis = torch.tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    K = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return torch.eye(3, dtype=torch.float64) + torch.sin(torch.tensor(angle)) * K + (1 - torch.cos(torch.tensor(angle))) * K @ K


def test_rigid_motion_of_the_seen_nodes_extends_exactly():
    positions, edges, weights = grid_graph()
    N = positions.shape[0]
    R = rotation([0.2, 1.0, 0.1], 0.3)
    shift = torch.tensor([0.01, -0.02, 0.005], dtype=torch.float64)
    centre = positions.mean(dim=0)
    # Increment of node i about its own position: p_i -> R (p_i - c) + c + shift.
    truth_dt = (positions - centre) @ R.T + centre + shift - positions
    hidden = positions[:, 0] > 0.12                     # the far columns are not seen
    dR = R.repeat(N, 1, 1)
    dt = truth_dt.clone()
    dR[hidden] = torch.eye(3, dtype=torch.float64)      # a poor start: no motion at all
    dt[hidden] = 0
    out_R, out_t = arap_extension(positions, edges, weights, dR, dt, hidden, iterations=100)
    assert torch.allclose(out_t, truth_dt, atol=1e-5), (out_t - truth_dt).norm(dim=1).max()
    assert torch.allclose(out_R, R.expand(N, 3, 3), atol=1e-4)
    assert torch.equal(out_R[~hidden], dR[~hidden]) and torch.equal(out_t[~hidden], dt[~hidden])


def test_a_hidden_part_without_a_path_keeps_its_start():
    positions, edges, weights = grid_graph(3)
    N = positions.shape[0]
    far = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    positions = torch.cat((positions, far))
    edges = torch.cat((edges, torch.full((1, edges.shape[1]), -1)))
    weights = torch.cat((weights, torch.zeros(1, weights.shape[1])))
    hidden = torch.zeros(N + 1, dtype=torch.bool)
    hidden[-1] = True
    hidden[0] = True
    dR = torch.eye(3, dtype=torch.float64).repeat(N + 1, 1, 1)
    dt = torch.zeros(N + 1, 3, dtype=torch.float64)
    dt[-1] = torch.tensor([0.0, 0.0, 0.01])
    dt[1:N] = torch.tensor([0.02, 0.0, 0.0])
    out_R, out_t = arap_extension(positions, edges, weights, dR, dt, hidden)
    assert torch.allclose(out_t[-1], dt[-1]) and torch.allclose(out_R[-1], dR[-1])
    # Node 0 has seen neighbours that all moved by 0.02 in x: it follows them.
    assert torch.allclose(out_t[0], torch.tensor([0.02, 0.0, 0.0], dtype=torch.float64), atol=1e-5)


def test_matches_the_dense_reference():
    """The edge-list iteration against the dense one of tests/reference (random graph, random
    motions, a hidden part with a component cut off from every seen node, asymmetric and
    repeated edges, a self-loop)."""
    from tests.reference.hidden_reference import arap_extension_reference
    gen = torch.Generator().manual_seed(3)
    positions, edges, weights = grid_graph(4)
    N = positions.shape[0]
    weights = weights * (0.5 + torch.rand(weights.shape, generator=gen))   # w_ij != w_ji
    edges = edges.clone()
    edges[0, 0] = 0                                      # a self-loop
    edges[1, 1] = edges[1, 0]                            # a repeated edge
    edges[2, 2] = -1                                     # a missing one
    island = torch.tensor([[1.0, 1.0, 1.0], [1.05, 1.0, 1.0]], dtype=torch.float64)
    positions = torch.cat((positions, island))
    edges = torch.cat((edges, torch.tensor([[N + 1] + [-1] * (edges.shape[1] - 1), [N] + [-1] * (edges.shape[1] - 1)])))
    weights = torch.cat((weights, torch.full((2, weights.shape[1]), 0.7)))
    M = N + 2
    hidden = torch.rand(M, generator=gen) < 0.4
    hidden[-2:] = True
    axis = torch.randn(M, 3, generator=gen, dtype=torch.float64) * 0.2
    dR = torch.stack([rotation(a.tolist(), float(a.norm())) for a in axis])
    dt = torch.randn(M, 3, generator=gen, dtype=torch.float64) * 0.01
    out_R, out_t = arap_extension(positions, edges, weights, dR, dt, hidden, iterations=7)
    ref_R, ref_t = arap_extension_reference(positions, edges, weights, dR, dt, hidden, iterations=7)
    assert torch.allclose(out_t, ref_t, atol=1e-10), (out_t - ref_t).abs().max()
    assert torch.allclose(out_R, ref_R, atol=1e-9), (out_R - ref_R).abs().max()


def test_a_graph_of_thousands_of_nodes():
    """4000 nodes, a third hidden: runs without an N x N matrix (the edge list), and a rigid
    motion still extends exactly."""
    gen = torch.Generator().manual_seed(4)
    positions = torch.rand(4000, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.1])
    ids, distances = knn(positions.float(), positions.float(), 9)
    edges, weights = ids[:, 1:].long(), torch.exp(-distances[:, 1:] ** 2 / (2 * 0.02 ** 2)).float()
    R = rotation([0.3, 0.2, 1.0], 0.2)
    centre = positions.mean(dim=0)
    truth_dt = (positions - centre) @ R.T + centre - positions
    hidden = positions[:, 0] > 0.66
    dR = R.repeat(4000, 1, 1)
    dt = truth_dt.clone()
    dt[hidden] += 0.01
    out_R, out_t = arap_extension(positions, edges, weights, dR, dt, hidden, iterations=30)
    assert (out_t - truth_dt).norm(dim=1).max() < 1e-3


def test_edge_rest_store_updates_and_looks_up():
    i, j = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    store = update_edge_rest(None, i, j, torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]]))
    store = update_edge_rest(store, torch.tensor([1]), torch.tensor([2]), torch.tensor([[5.0, 0, 0]]))
    default = torch.full((4, 3), -1.0, dtype=torch.float64)
    got = lookup_edge_rest(store, torch.tensor([0, 1, 2, 1]), torch.tensor([1, 2, 0, 0]), default)
    assert got[:, 0].tolist() == [1.0, 5.0, 3.0, -1.0] and got.dtype == torch.float64
    assert torch.equal(lookup_edge_rest(None, i, j, default[:3]), default[:3])


def test_edge_rest_store_averages_with_a_blend():
    """blend < 1: a stored edge moves that fraction of the way to the new vector (an exponential
    average), a new edge takes the new vector whole, an edge not given keeps its own."""
    store = update_edge_rest(None, torch.tensor([0, 1]), torch.tensor([1, 2]),
                             torch.tensor([[4.0, 0, 0], [0.0, 4.0, 0]]), frame=1)
    store = update_edge_rest(store, torch.tensor([0, 2]), torch.tensor([1, 0]),
                             torch.tensor([[8.0, 0, 0], [0.0, 0, 8.0]]), frame=2, blend=0.25)
    keys, vectors, frames = store
    assert (keys // EDGE_KEY).tolist() == [0, 1, 2] and frames.tolist() == [2, 1, 2]
    assert torch.allclose(vectors, torch.tensor([[5.0, 0, 0], [0.0, 4.0, 0], [0.0, 0, 8.0]]))


def test_edge_rest_store_fades_toward_the_canonical_shape():
    """Each stored vector keeps the frame that saw it; faded, its weight halves every half-life
    frames since then, the rest going to the canonical q_j - q_i; half-life 0 keeps it whole."""
    positions = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0.0, 2.0, 0]])
    store = update_edge_rest(None, torch.tensor([0, 1]), torch.tensor([1, 0]),
                             torch.tensor([[3.0, 0, 0], [-3.0, 0, 0]]), frame=2)
    store = update_edge_rest(store, torch.tensor([0]), torch.tensor([2]), torch.tensor([[0.0, 4.0, 0]]), frame=6)
    assert store[2].tolist() == [2, 6, 2]                       # keys 0->1, 0->2, 1->0
    assert fade_edge_rest(store, positions, 6, 0.0) is store
    keys, vectors, frames = fade_edge_rest(store, positions, 6, 4.0)
    assert torch.equal(keys, store[0]) and torch.equal(frames, store[2])
    # 0 -> 1 seen 4 frames ago: half of (3, 0, 0) and half of the canonical (1, 0, 0); 0 -> 2 now.
    assert torch.allclose(vectors, torch.tensor([[2.0, 0, 0], [0.0, 4.0, 0], [-2.0, 0, 0]]))
    _, vectors, _ = fade_edge_rest(store, positions, 1000, 4.0)
    assert torch.allclose(vectors, torch.tensor([[1.0, 0, 0], [0.0, 2.0, 0], [-1.0, 0, 0]]))


def test_last_seen_edge_shapes_carry_a_bend_into_the_hidden_part():
    """A grid bent onto a cylinder (radius 0.3 m about the y axis): with the seen columns at the
    truth, the canonical rest continues the hidden columns straight from the seen border; the
    edges' shapes as last seen (all bent) give back the bend."""
    positions, edges, weights = grid_graph()
    N = positions.shape[0]
    r = 0.3
    x, y, z = positions.unbind(dim=1)
    angle = x / r
    bent = torch.stack(((r + z) * torch.sin(angle), y, (r + z) * torch.cos(angle) - r), dim=1)
    R = torch.stack([rotation([0.0, 1.0, 0.0], float(a)) for a in angle])
    i = torch.arange(N)[:, None].expand_as(edges).reshape(-1)
    i, j = torch.cat((i, edges.reshape(-1))), torch.cat((edges.reshape(-1), i))     # both directions
    store = update_edge_rest(None, i, j, torch.einsum("eba,eb->ea", R[i], bent[j] - bent[i]))
    hidden = positions[:, 0] > 0.09
    dR, dt = R.clone(), bent - positions
    dR[hidden], dt[hidden] = torch.eye(3, dtype=torch.float64), 0.0
    errors = {}
    for name, rest in (("canonical", None), ("seen", store)):
        _, out_t = arap_extension(positions, edges, weights, dR, dt, hidden, iterations=200, rest=rest)
        errors[name] = float((out_t - (bent - positions))[hidden].norm(dim=1).max())
    assert errors["seen"] < 1e-4 < 5e-3 < errors["canonical"], errors
