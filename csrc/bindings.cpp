// The one Python module of the extension (nnrt_ext). Each op's header documents shapes and
// dtypes and routes CPU tensors to its CPU launcher and CUDA tensors to its CUDA launcher.
#include "common.h"
#include "fusion/fusion.h"
#include "graph/graph.h"
#include "hashgrid/hashgrid.h"
#include "image/image.h"
#include "solver/solver.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++/CUDA ops of neural non-rigid tracking (see csrc/*/*.h for shapes)";
  m.def("with_cuda", [] {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA launchers.");

  // image
  m.def("backproject_depth", &nnrt::BackprojectDepth, py::arg("depth"), py::arg("fx"), py::arg("fy"),
        py::arg("cx"), py::arg("cy"), py::arg("max_depth"));
  m.def("depth_boundary_mask", &nnrt::DepthBoundaryMask, py::arg("points"), py::arg("radius"),
        py::arg("max_distance"));
  m.def("mesh_from_depth", &nnrt::MeshFromDepth, py::arg("points"), py::arg("max_edge_length"));

  // graph
  m.def("erode_mesh", &nnrt::ErodeMesh, py::arg("faces"), py::arg("num_vertices"),
        py::arg("iterations"), py::arg("min_neighbors"));
  m.def("sample_nodes", &nnrt::SampleNodes, py::arg("vertices"), py::arg("mask"),
        py::arg("coverage"));
  m.def("geodesic_node_distances", &nnrt::GeodesicNodeDistances, py::arg("vertices"),
        py::arg("faces"), py::arg("node_vertices"), py::arg("max_distance"));
  m.def("geodesic_edges", &nnrt::GeodesicEdges, py::arg("offsets"), py::arg("vertex_ids"),
        py::arg("distances"), py::arg("node_vertices"), py::arg("num_vertices"), py::arg("K"));
  m.def("geodesic_anchors", &nnrt::GeodesicAnchors, py::arg("offsets"), py::arg("vertex_ids"),
        py::arg("distances"), py::arg("node_valid"), py::arg("num_vertices"), py::arg("K"),
        py::arg("coverage"));
  m.def("euclidean_knn", &nnrt::EuclideanKnn, py::arg("nodes"), py::arg("queries"), py::arg("K"),
        py::arg("exclude_self"));
  m.def("valid_nodes_by_edge_count", &nnrt::ValidNodesByEdgeCount, py::arg("edges"),
        py::arg("min_edges"));
  m.def("connected_components", &nnrt::ConnectedComponents, py::arg("edges"),
        py::arg("node_valid"));

  // fusion
  m.def("integrate_warped", &nnrt::IntegrateWarped, py::arg("tsdf"), py::arg("weight"),
        py::arg("color"), py::arg("block_keys"), py::arg("block_slots"), py::arg("candidates"),
        py::arg("nodes"), py::arg("rotations"), py::arg("translations"), py::arg("depth"),
        py::arg("image"), py::arg("mask"), py::arg("voxel_size"), py::arg("truncation"),
        py::arg("weight_cap"), py::arg("fx"), py::arg("fy"), py::arg("cx"), py::arg("cy"),
        py::arg("coverage"), py::arg("max_anchor_distance"), py::arg("num_anchors"),
        py::arg("dual_quaternion"));

  // solver
  m.def("assemble_normal_equations", &nnrt::AssembleNormalEquations, py::arg("J"), py::arg("r"),
        py::arg("nodes"), py::arg("num_samples"), py::arg("num_nodes"));
  m.def("assemble_normal_equations_backward", &nnrt::AssembleNormalEquationsBackward,
        py::arg("grad_A"), py::arg("grad_b"), py::arg("J"), py::arg("r"), py::arg("nodes"),
        py::arg("num_nodes"));
  m.def("term_block_keys", &nnrt::CheckedTermBlockKeys, py::arg("nodes"), py::arg("num_samples"),
        py::arg("num_nodes"));
  m.def("build_block_pattern", &nnrt::BuildBlockPattern, py::arg("nodes_list"),
        py::arg("num_samples"), py::arg("num_nodes"));
  m.def("build_block_pattern_sorted", &nnrt::BuildBlockPatternSorted, py::arg("nodes_list"),
        py::arg("num_samples"), py::arg("num_nodes"));
  m.def("assemble_blocks", &nnrt::AssembleBlocks, py::arg("J"), py::arg("r"), py::arg("nodes"),
        py::arg("entry_order"), py::arg("entry_start"), py::arg("slot_order"),
        py::arg("slot_start"), py::arg("blocks"), py::arg("b"), py::arg("accumulate"));
  m.def("assemble_blocks_backward", &nnrt::AssembleBlocksBackward, py::arg("grad_blocks"),
        py::arg("grad_b"), py::arg("J"), py::arg("r"), py::arg("nodes"), py::arg("term_blocks"));
  m.def("build_slot_lists", &nnrt::BuildSlotLists, py::arg("nodes_list"), py::arg("num_samples"),
        py::arg("num_nodes"));
  m.def("assemble_dense", &nnrt::AssembleDense, py::arg("J"), py::arg("r"), py::arg("nodes"),
        py::arg("slot_order"), py::arg("slot_start"), py::arg("A"), py::arg("b"), py::arg("accumulate"),
        py::arg("finish"));
  m.def("assemble_dense_match", &nnrt::AssembleDenseMatch, py::arg("structure"), py::arg("w"), py::arg("r"),
        py::arg("nodes"), py::arg("slot_order"), py::arg("slot_start"), py::arg("A"), py::arg("b"),
        py::arg("accumulate"), py::arg("finish"));
  m.def("factor_upper_", &nnrt::FactorUpperInPlace, py::arg("A"));
  m.def("has_lapack_factor", &nnrt::HasLapackFactor,
        "Whether factor_upper_ can run (LAPACK's potrf found in this process).");
  m.def("blocks_to_dense", &nnrt::BlocksToDense, py::arg("blocks"), py::arg("block_row"),
        py::arg("block_col"), py::arg("num_samples"), py::arg("num_nodes"));
  m.def("block_matvec", &nnrt::BlockMatvec, py::arg("blocks"), py::arg("block_row"),
        py::arg("block_col"), py::arg("row_start"), py::arg("col_order"), py::arg("col_start"),
        py::arg("x"));
  m.def("solve_step_backward", &nnrt::StepBackward, py::arg("J"), py::arg("r"), py::arg("nodes"),
        py::arg("u"), py::arg("x"));
  m.def("match_terms", &nnrt::MatchTerms, py::arg("source_points"), py::arg("anchors"),
        py::arg("anchor_weights"), py::arg("nodes"), py::arg("target_pixels"),
        py::arg("target_depth"), py::arg("weights"), py::arg("intrinsics"), py::arg("rotations"),
        py::arg("translations"), py::arg("flow_weight"), py::arg("depth_weight"),
        py::arg("robust"), py::arg("robust_scale"), py::arg("jacobian") = true);
  m.def("match_step_backward", &nnrt::MatchStepBackward, py::arg("structure"), py::arg("w"), py::arg("r"),
        py::arg("nodes"), py::arg("u"), py::arg("x"));
  m.def("left_rotate", &nnrt::LeftRotate, py::arg("w"), py::arg("R"));
  m.def("left_rotate_backward", &nnrt::LeftRotateBackward, py::arg("w"), py::arg("R"), py::arg("grad"));
  m.def("edge_terms", &nnrt::EdgeTerms, py::arg("edges"), py::arg("weights"), py::arg("nodes"),
        py::arg("rotations"), py::arg("translations"));
  m.def("edge_terms_backward", &nnrt::EdgeTermsBackward, py::arg("edges"), py::arg("weights"),
        py::arg("nodes"), py::arg("rotations"), py::arg("translations"), py::arg("grad_res"),
        py::arg("grad_J"));
  m.def("match_terms_backward", &nnrt::MatchTermsBackward, py::arg("source_points"),
        py::arg("anchors"), py::arg("anchor_weights"), py::arg("nodes"), py::arg("target_pixels"),
        py::arg("target_depth"), py::arg("weights"), py::arg("intrinsics"), py::arg("rotations"),
        py::arg("translations"), py::arg("flow_weight"), py::arg("depth_weight"),
        py::arg("robust"), py::arg("robust_scale"), py::arg("root"), py::arg("grad_res"),
        py::arg("grad_J"), py::arg("grad_structure"));

  // hashgrid
  m.def("hashgrid_forward", &nnrt::HashGridForward, py::arg("x"), py::arg("table"),
        py::arg("resolutions"));
  m.def("hashgrid_backward", &nnrt::HashGridBackward, py::arg("grad_out"), py::arg("x"),
        py::arg("table"), py::arg("resolutions"), py::arg("need_table_grad"),
        py::arg("need_input_grad"));
}
