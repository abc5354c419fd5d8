"""The Gauss-Newton loop (docs/DESIGN.md 5.3): preparation, linearisation and a short loop.

Energy of one sample (c = correspondence weight, u' = target pixel, z' = target depth):
    sum_m  flow_weight  * c^2 * |pi(x'_m) - u'_m|^2          (2 rows per match)
         + depth_weight * c^2 * (x'_m.z - z'_m)^2            (1 row per match)
  + sum_(i,j) arap_weight * w_ij^2 * |R_i (g_j - g_i) + g_i + t_i - (g_j + t_j)|^2   (3 rows)
Unknowns per node: an axis-angle rotation increment composed on the left, R <- exp(dw) R, and a
translation increment, t <- t + dt. Each iteration solves (J^T J + damping I) dx = -J^T r.

Batches: nodes are padded to N per sample; matches are packed over the batch (a sample id per
match). Nodes that are padding or removed with their cluster are not unknowns: their rows of the
system get an identity diagonal (so their increment is 0) and they keep R = I, t = 0, so no
re-indexing is needed.

Host synchronisation: the preparation reads per-sample counts back once (to decide failures and
the linear solver); the loop itself queues work without reading the device (per-sample status
is kept in tensors), except the CPU's early exit when every sample has converged and CG's
batched convergence checks; energies and statuses come back in one transfer at the end.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from model.solver.linear_solvers import StepSetup, gauss_newton_step, memory_estimate_gb
from model.solver.normal_equations import build_block_pattern, build_slot_lists
from model.solver.problem import SolveStatus, SolverProblem, SolverResult
from model.solver.terms import edge_terms, icp_terms, match_terms, robust_icp_weights
from model.warp import left_rotate
from options import SolverOptions


def _subsample(sample: torch.Tensor, B: int, max_matches: int,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """Indices of at most max_matches random matches per sample (all when max_matches <= 0)."""
    if max_matches <= 0:
        return torch.arange(sample.numel(), device=sample.device)
    keep = []
    for b in range(B):
        index = torch.nonzero(sample == b).squeeze(1)
        if index.numel() > max_matches:
            perm = torch.randperm(index.numel(), generator=generator, device="cpu")[:max_matches]
            index = index[perm.to(index.device)].sort().values
        keep.append(index)
    # Increasing, as the input order: _prepare relies on it (a full index is the identity).
    if len(keep) == 1:
        return keep[0]
    return torch.cat(keep).sort().values if keep else sample.new_zeros(0)


@dataclass
class _Prepared:
    """The terms of a batch, fixed for the whole solve."""

    B: int
    N: int
    messages: List[str]            # per sample, "" while it may be solved
    running: torch.Tensor          # (B,) bool
    node_active: torch.Tensor      # (B, N) bool: an unknown of a running sample
    num_matches: torch.Tensor      # (B,)
    sample: torch.Tensor           # (M,) per match
    flat_anchors: torch.Tensor     # (M, 4) flat node ids
    anchor_weights: torch.Tensor
    weights: torch.Tensor
    source_points: torch.Tensor    # (M, 3)
    target_pixels: torch.Tensor
    target_depth: torch.Tensor
    intrinsics: torch.Tensor       # (M, 4)
    sources: torch.Tensor          # (E,) flat node ids
    targets: torch.Tensor
    edge_w: torch.Tensor
    edge_sample: torch.Tensor
    edge_nodes: torch.Tensor       # (E, 2)
    nodes_flat: torch.Tensor       # (BN, 3)
    diagonal: torch.Tensor         # (B, 6N)
    linear_solver: str
    icp: Optional["_ICPTerms"] = None  # the point-to-plane terms (icp_weight > 0 and given)


@dataclass
class _ICPTerms:
    """The problem's point-to-plane terms that are solved (P of them)."""

    sample: torch.Tensor           # (P,)
    flat_anchors: torch.Tensor     # (P, 4)
    anchor_weights: torch.Tensor
    weights: torch.Tensor
    source_points: torch.Tensor    # (P, 3)
    target_points: torch.Tensor
    target_normals: torch.Tensor


def _select_icp(p: SolverProblem, options: SolverOptions, node_active: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the usable point-to-plane terms (finite, in range, four active anchors), or
    None when the term is off."""
    if options.icp_weight <= 0 or p.icp_sample is None:
        return None
    N = p.nodes.shape[1]
    ok = (torch.isfinite(p.icp_source_points).all(dim=1) & torch.isfinite(p.icp_target_points).all(dim=1)
          & torch.isfinite(p.icp_target_normals).all(dim=1) & torch.isfinite(p.icp_weights)
          & (p.icp_source_points[:, 2] > 0) & (p.icp_source_points[:, 2] <= options.max_depth))
    ok &= ((p.icp_anchors >= 0) & (p.icp_anchors < p.num_nodes.index_select(0, p.icp_sample)[:, None])).all(dim=1)
    flat = p.icp_sample[:, None] * N + p.icp_anchors.clamp(min=0)
    ok &= node_active.reshape(-1)[flat].all(dim=1)
    return torch.nonzero(ok).squeeze(1)


def _icp_terms(p: SolverProblem, index: torch.Tensor, running: torch.Tensor) -> _ICPTerms:
    N = p.nodes.shape[1]
    index = index[running[p.icp_sample[index]]]
    sample = p.icp_sample[index]
    flat_anchors = sample[:, None] * N + p.icp_anchors[index]
    return _ICPTerms(sample=sample, flat_anchors=flat_anchors, anchor_weights=p.icp_anchor_weights[index],
                     weights=p.icp_weights[index], source_points=p.icp_source_points[index],
                     target_points=p.icp_target_points[index], target_normals=p.icp_target_normals[index])


def _select_matches(p: SolverProblem, options: SolverOptions, generator):
    """Indices of the usable matches: finite inputs, points in range, four anchors among the
    sample's nodes; at most max_matches per sample."""
    B = p.nodes.shape[0]
    ok = (torch.isfinite(p.source_points).all(dim=1) & torch.isfinite(p.target_pixels).all(dim=1)
          & torch.isfinite(p.target_depth) & torch.isfinite(p.weights)
          & (p.source_points[:, 2] > 0) & (p.source_points[:, 2] <= options.max_depth)
          & (p.target_depth > 0) & (p.target_depth <= options.max_depth))
    anchor_ok = (p.anchors >= 0) & (p.anchors < p.num_nodes.index_select(0, p.match_sample)[:, None])
    ok &= anchor_ok.all(dim=1)
    index = torch.nonzero(ok).squeeze(1)
    return index[_subsample(p.match_sample[index], B, options.max_matches, generator)]


def _active_nodes(p: SolverProblem, options: SolverOptions, node_exists, flat_anchors, index):
    """(B, N) bool: existing nodes whose cluster has enough match weight (all with
    remove_clusters off); index: the usable matches."""
    B, N = node_exists.shape
    node_active = node_exists.clone()
    if options.remove_clusters:
        with torch.no_grad():
            device = node_exists.device
            anchor_weights, weights = p.anchor_weights[index], p.weights[index]
            node_weight = torch.zeros(B * N, dtype=torch.float64, device=device)
            node_weight.index_add_(0, flat_anchors.reshape(-1),
                                   (anchor_weights * weights[:, None]).reshape(-1).double())
            clusters = torch.where(node_exists, p.clusters, torch.zeros_like(p.clusters))
            num_clusters = int(clusters.max()) + 1 if clusters.numel() else 1
            flat_cluster = (torch.arange(B, device=device)[:, None] * num_clusters + clusters).reshape(-1)
            cluster_weight = torch.zeros(B * num_clusters, dtype=torch.float64, device=device)
            cluster_weight.index_add_(0, flat_cluster, node_weight)
            node_active &= (cluster_weight[flat_cluster] >= options.min_cluster_weight).reshape(B, N)
    return node_active


def _prepare(p: SolverProblem, options: SolverOptions, generator) -> _Prepared:
    # (1-D gathers by sample use index_select: a third of advanced indexing's cost at 10k.)
    B, N = p.nodes.shape[:2]
    device, dtype = p.nodes.device, p.nodes.dtype
    node_exists = torch.arange(N, device=device)[None, :] < p.num_nodes[:, None]
    index = _select_matches(p, options, generator)
    # Every match kept (the usual case with clean correspondences; index is increasing, so then
    # the identity): no gathers.
    every = index.shape[0] == p.match_sample.shape[0]
    sample = p.match_sample if every else p.match_sample.index_select(0, index)
    flat_anchors = sample[:, None] * N + (p.anchors if every else p.anchors.index_select(0, index))
    node_active = _active_nodes(p, options, node_exists, flat_anchors, index)
    active_flat = node_active.reshape(-1)
    if options.remove_clusters:  # without, every selected match has its anchors among the nodes
        kept = active_flat[flat_anchors].all(dim=1)
        index, flat_anchors = index[kept], flat_anchors[kept]
        sample = p.match_sample.index_select(0, index)
    num_matches = torch.bincount(sample, minlength=B)

    # Edges i -> j between active nodes.
    K = p.edges.shape[2]
    edge_b, edge_i, edge_k = torch.nonzero(p.edges >= 0, as_tuple=True)
    edge_j = p.edges[edge_b, edge_i, edge_k]
    sources, targets = edge_b * N + edge_i, edge_b * N + edge_j.clamp(max=N - 1)
    edge_ok = (edge_j < p.num_nodes[edge_b]) & active_flat[sources] & active_flat[targets]
    num_edges = torch.bincount(edge_b[edge_ok], minlength=B)
    icp_index = _select_icp(p, options, node_active)
    num_icp = (torch.zeros_like(num_edges) if icp_index is None
               else torch.bincount(p.icp_sample[icp_index], minlength=B))

    # Per-sample checks, read back once: node counts, matches, memory of the linear solve.
    counts = torch.stack((node_active.sum(dim=1), p.num_nodes, num_matches, num_edges, num_icp)).tolist()
    linear_solver = options.linear_solver
    if linear_solver == "auto":
        linear_solver = "sparse" if N > options.sparse_min_nodes else "dense"
    messages = [""] * B
    for b in range(B):
        n_active, n_exist, n_matches, n_edges, n_icp = (counts[k][b] for k in range(5))
        memory = memory_estimate_gb(linear_solver, N if linear_solver == "dense" else n_exist,
                                    [(n_matches, 4), (n_edges, 2), (n_icp, 4)], dtype)
        if n_exist > options.max_nodes:
            messages[b] = f"too many nodes: {n_exist} > max_nodes {options.max_nodes}"
        elif n_active < options.min_nodes:
            messages[b] = (f"too few nodes to solve: {n_active} of {n_exist} left after removing "
                           f"clusters with match weight < {options.min_cluster_weight} "
                           f"(min_nodes {options.min_nodes})")
        elif n_matches == 0:
            messages[b] = "no valid matches"
        elif memory > options.max_memory_gb:
            messages[b] = (f"the {linear_solver} linear solve of {n_exist} nodes would need about "
                           f"{memory:.1f} GiB > --max-memory-gb {options.max_memory_gb:g}"
                           + (" (try --linear-solver sparse)" if linear_solver == "dense" else ""))
    running_list = [not m for m in messages]
    running = torch.tensor(running_list, device=device)
    node_active &= running[:, None]

    if not all(running_list):
        keep = running[sample]
        index, sample, flat_anchors = index[keep], sample[keep], flat_anchors[keep]
    take = (lambda t: t) if index.shape[0] == p.match_sample.shape[0] else (lambda t: t[index])  # noqa: E731
    anchor_weights = take(p.anchor_weights)
    edge_ok &= running[edge_b]
    sources, targets = sources[edge_ok], targets[edge_ok]
    if options.edge_weighting:
        edge_w = K * p.edge_weights[edge_b[edge_ok], edge_i[edge_ok], edge_k[edge_ok]].to(dtype)
    else:
        edge_w = torch.ones(sources.shape[0], dtype=dtype, device=device)
    # Damping on the diagonal; rows of nodes that are not unknowns (padding, removed clusters,
    # failed samples) get 1 so that the system stays regular even without damping.
    diagonal = torch.where(node_active.repeat_interleave(6, dim=1),
                           torch.full((), options.lm_damping, dtype=dtype, device=device),
                           torch.ones((), dtype=dtype, device=device))
    return _Prepared(
        B=B, N=N, messages=messages, running=running, node_active=node_active,
        num_matches=num_matches, sample=sample, flat_anchors=flat_anchors,
        anchor_weights=anchor_weights, weights=take(p.weights),
        source_points=take(p.source_points),
        target_pixels=take(p.target_pixels), target_depth=take(p.target_depth),
        intrinsics=p.intrinsics.index_select(0, sample), sources=sources, targets=targets, edge_w=edge_w,
        edge_sample=sources // N, edge_nodes=torch.stack((sources, targets), dim=1),
        nodes_flat=p.nodes.reshape(B * N, 3), diagonal=diagonal, linear_solver=linear_solver,
        icp=None if icp_index is None else _icp_terms(p, icp_index, running))


def _linearise(prep: _Prepared, rotations, translations, options: SolverOptions, iteration: int,
               jacobians: bool = True):
    """The term groups at the current motion as gauss_newton_step takes them (flat (J, r, nodes)
    triples: matches, edges, then the point-to-plane terms when on) with their skinning list,
    and the data and ARAP energies (B,) float64 of each sample. The dense solve gets the match
    terms as their structure instead of J (what its assembly and backward read; J is not formed);
    without jacobians (energies only) neither."""
    # Iteratively reweighted least squares on the reprojection error of each match (inside the
    # op). Not at the first linearisation: at the identity motion every residual is as large as
    # the motion itself, and no match is an outlier yet.
    robust = options.robust_loss if iteration >= 1 else "none"
    structured = prep.linear_solver == "dense"
    r_m, J_m, structure = match_terms(prep.source_points, prep.flat_anchors, prep.anchor_weights,
                                      prep.nodes_flat, prep.target_pixels, prep.target_depth, prep.weights,
                                      prep.intrinsics, rotations, translations, options.flow_weight,
                                      options.depth_weight, robust, options.robust_scale, structure=True,
                                      jacobian=jacobians and not structured)
    r_e, J_e = edge_terms(prep.sources, prep.targets, prep.edge_w, prep.nodes_flat, rotations,
                          translations, options.arap_weight)
    data = _sum_of_squares(r_m, prep.sample, prep.B)
    groups = [structure if structured else J_m, r_m, prep.flat_anchors, J_e, r_e, prep.edge_nodes]
    skinning = [prep.anchor_weights if structured else None, None]
    if prep.icp is not None:
        t = prep.icp
        r_i, J_i = icp_terms(t.source_points, t.flat_anchors, t.anchor_weights, prep.nodes_flat, t.target_points,
                             t.target_normals, t.weights, rotations, translations, options.icp_weight,
                             jacobians=jacobians)
        if options.robust_loss != "none" and iteration >= 1:
            root = robust_icp_weights(r_i, t.weights, options.icp_weight, options.robust_loss,
                                      options.icp_robust_scale)
            r_i = r_i * root[:, None]
            J_i = J_i * root[:, None, None] if jacobians else None
        groups += [J_i, r_i, t.flat_anchors]
        skinning.append(None)
        data = data + _sum_of_squares(r_i, t.sample, prep.B)
    return (groups, skinning), data, _sum_of_squares(r_e, prep.edge_sample, prep.B)


def _sum_of_squares(residuals: torch.Tensor, sample: torch.Tensor, B: int) -> torch.Tensor:
    """(B,) float64: each sample's sum of squared residuals (R terms (R, k) of samples (R,)),
    without gradient. One sample (the common case) in one reduction: a tenth of the scatter's
    time at 10k terms."""
    with torch.no_grad():
        r = residuals.detach()
        if B == 1:
            return (torch.linalg.vector_norm(r, dtype=torch.float64) ** 2).reshape(1)
        out = torch.zeros(B, dtype=torch.float64, device=r.device)
        return out.index_add_(0, sample, (r.double() ** 2).sum(dim=1))


def solve(problem: SolverProblem, options: SolverOptions = SolverOptions(),
          generator: Optional[torch.Generator] = None) -> SolverResult:
    """Runs the damped Gauss-Newton solve for every sample of the batch.

    Never raises for a bad sample: too few or too many nodes, no valid match, a linear solve
    over the memory budget, a non-finite or singular system, conjugate gradients that do not
    converge mark that sample failed (identity motion) and the others are solved.
    Gradients flow to weights, target_pixels, target_depth and source_points.
    """
    prep = _prepare(problem, options, generator)
    B, N = prep.B, prep.N
    device, dtype = problem.nodes.device, problem.nodes.dtype
    groups = [prep.flat_anchors, prep.edge_nodes] + ([prep.icp.flat_anchors] if prep.icp is not None else [])
    # The block pattern only where the sparse solve needs it; the dense assembly needs the
    # slot lists alone (sorting every slot pair of 10k matches costs more than a step).
    layout = (build_block_pattern(groups, B, N) if prep.linear_solver == "sparse"
              else build_slot_lists(groups, B, N))
    setup = StepSetup(layout,
                      linear_solver=prep.linear_solver, cg_max_iterations=options.cg_max_iterations,
                      cg_tolerance=options.cg_tolerance)
    rotations = torch.eye(3, dtype=dtype, device=device).repeat(B * N, 1, 1)
    translations = torch.zeros(B * N, 3, dtype=dtype, device=device)
    running, updating = prep.running.clone(), prep.running.clone()
    step_failed = torch.zeros(B, dtype=torch.bool, device=device)
    cg_failed = torch.zeros(B, dtype=torch.bool, device=device)
    cg_residual = torch.zeros(B, dtype=torch.float64, device=device)
    converged = torch.zeros(B, dtype=torch.bool, device=device)
    iterations = torch.zeros(B, dtype=torch.int64, device=device)
    energy_rows, cg_rows = [], []
    on_cpu = device.type == "cpu"
    for iteration in range(options.iterations):
        if on_cpu and not bool(updating.any()):
            break  # on a GPU the remaining iterations run masked instead of syncing here
        (groups, skinning), data, arap = _linearise(prep, rotations, translations, options, iteration)
        energy_rows.append((data, arap, updating.any()))
        delta, failed = gauss_newton_step(prep.diagonal, B, N, *groups, setup=setup, skinning=skinning)
        newly = failed & updating
        step_failed |= newly
        if setup.linear_solver == "sparse":
            cg_failed |= newly
            cg_residual = torch.where(newly, setup.cg_residual.double(), cg_residual)
            cg_rows.append((setup.cg_iterations, updating.clone()))
        # Out of place: torch.where below saves `updating` for its backward.
        updating = updating & ~failed
        running = running & ~failed
        delta = torch.where(updating[:, None], delta, torch.zeros_like(delta))
        setup.warm_start = delta.detach()
        delta = delta.reshape(B * N, 6)
        rotations = left_rotate(delta[:, :3], rotations)
        translations = translations + delta[:, 3:]
        with torch.no_grad():
            step = delta.detach().abs().reshape(B, N * 6).amax(dim=1)
            iterations += updating.long()
            small = updating & (step < options.convergence_tolerance)
            converged |= small
            updating = updating & ~small
    with torch.no_grad():  # the energies of the result only: nothing to differentiate
        _, data, arap = _linearise(prep, rotations, translations, options, options.iterations, jacobians=False)
    energy_rows.append((data, arap, torch.ones((), dtype=torch.bool, device=device)))
    return _result(prep, options, rotations, translations, running, step_failed, cg_failed,
                   cg_residual, converged, iterations, energy_rows, cg_rows, setup.linear_solver)


def _result(prep, options, rotations, translations, running, step_failed, cg_failed, cg_residual,
            converged, iterations, energy_rows, cg_rows, linear_solver) -> SolverResult:
    """Statuses, messages and energies, read back from the device in one transfer."""
    B, N = prep.B, prep.N
    dtype, device = rotations.dtype, rotations.device
    valid = running
    solved = (prep.node_active & valid[:, None]).reshape(B * N)
    eye3 = torch.eye(3, dtype=dtype, device=device).expand(B * N, 3, 3)
    rotations = torch.where(solved[:, None, None], rotations, eye3)
    translations = torch.where(solved[:, None], translations, torch.zeros_like(translations))
    with torch.no_grad():
        data = torch.stack([row[0] for row in energy_rows], dim=1)
        arap = torch.stack([row[1] for row in energy_rows], dim=1)
        applied = torch.stack([row[2] for row in energy_rows])
        host = [t.cpu() for t in (data, arap, applied, valid, step_failed, cg_failed, cg_residual,
                                  converged, iterations)]
        cg_updating = torch.stack([row[1] for row in cg_rows], dim=1).cpu() if cg_rows else None
    data, arap, applied, valid_h, step_failed, cg_failed, cg_residual, converged, iterations = host
    data, arap = data[:, applied], arap[:, applied]
    status, messages, energies, data_energies, arap_energies, cg_iterations = [], [], [], [], [], []
    for b in range(B):
        message = prep.messages[b]
        if not message and bool(cg_failed[b]):
            message = (f"linear solve: conjugate gradients did not reach --cg-tolerance "
                       f"{options.cg_tolerance:g} within --cg-max-iterations "
                       f"{options.cg_max_iterations} (relative residual {float(cg_residual[b]):.1e})")
        elif not message and bool(step_failed[b]):
            message = "singular or non-finite Gauss-Newton system"
        ok = bool(valid_h[b])
        status.append(SolveStatus.FAILED if not ok else
                      SolveStatus.CONVERGED if bool(converged[b]) else SolveStatus.MAX_ITERATIONS)
        messages.append(message)
        data_energies.append(data[b].tolist() if ok else [])
        arap_energies.append(arap[b].tolist() if ok else [])
        energies.append((data[b] + arap[b]).tolist() if ok else [])
        cg_iterations.append([count for i, (count, _) in enumerate(cg_rows) if bool(cg_updating[b, i])]
                             if cg_rows else [])
    return SolverResult(
        rotations=rotations.reshape(B, N, 3, 3), translations=translations.reshape(B, N, 3),
        node_valid=solved.reshape(B, N), valid=valid.clone(), status=status, messages=messages,
        energies=energies, data_energies=data_energies, arap_energies=arap_energies,
        num_matches=torch.where(valid, prep.num_matches, torch.zeros_like(prep.num_matches)),
        iterations=iterations.tolist(), linear_solver=linear_solver, cg_iterations=cg_iterations)
