"""Every option of the project, with its default and help text, in one typed place.

Each group is a dataclass; `add_options(parser, Group)` turns its fields into command-line flags
(`node_coverage` -> `--node-coverage`, booleans get `--flag / --no-flag`), and
`from_args(args, Group)` builds the dataclass back from the parsed flags. Scripts never redefine
a flag; checkpoints store these dataclasses as dicts so a model is rebuilt from the file alone.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Type, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def opt(default: Any, help: str, choices: Optional[tuple] = None) -> Any:  # noqa: A002
    """A dataclass field with help text (and optional choices) for its command-line flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


# ----------------------------------------------------------------------------------------------
# Deformation graph (DESIGN.md 5.1)


@dataclass
class GraphOptions:
    node_coverage: float = opt(0.05, "node coverage in metres: every kept vertex lies within this "
                                     "distance of a node; also the sigma of edge and skinning weights")
    max_depth: float = opt(6.0, "depths beyond this many metres are treated as invalid")
    max_triangle_edge: float = opt(0.05, "mesh from depth: longest triangle edge in metres")
    erosion_iterations: int = opt(10, "mesh erosion passes before node sampling")
    erosion_min_neighbors: int = opt(4, "erosion drops faces touching a vertex with fewer incident faces")
    num_neighbors: int = opt(8, "graph edges per node")
    num_anchors: int = opt(4, "anchor nodes per pixel")
    max_influence: Optional[float] = opt(None, "geodesic search radius in metres for edges and "
                                               "anchors (default: 2 x node coverage)")
    min_edges: int = opt(2, "nodes with fewer edges are removed (repeatedly)")
    min_cluster_size: int = opt(3, "connected components with fewer nodes are removed")
    mode: str = opt("geodesic", "distance for edges and anchors: along the mesh or straight-line",
                    choices=("geodesic", "euclidean"))

    @property
    def influence_radius(self) -> float:
        return self.max_influence if self.max_influence is not None else 2.0 * self.node_coverage


# ----------------------------------------------------------------------------------------------
# Command-line plumbing


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, group: Type, title: Optional[str] = None,
                defaults: Optional[Dict[str, Any]] = None) -> None:
    """Adds one flag per field of the dataclass `group` (defaults may be overridden)."""
    section = parser.add_argument_group(title or group.__name__)
    hints = get_type_hints(group)
    for f in dataclasses.fields(group):
        kind = hints[f.name]
        if get_origin(kind) is not None and type(None) in get_args(kind):  # Optional[X]
            kind = next(a for a in get_args(kind) if a is not type(None))
        default = (defaults or {}).get(f.name, f.default)
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        if kind is bool:
            section.add_argument(_flag(f.name), dest=f.name, default=default, help=help_text,
                                 action=argparse.BooleanOptionalAction)
        else:
            section.add_argument(_flag(f.name), dest=f.name, type=kind, default=default,
                                 choices=f.metadata.get("choices"), help=help_text)


def from_args(args: argparse.Namespace, group: Type[T]) -> T:
    """Builds the dataclass `group` from parsed flags added by `add_options`."""
    return group(**{f.name: getattr(args, f.name) for f in dataclasses.fields(group)})


def to_dict(options: Any) -> Dict[str, Any]:
    return dataclasses.asdict(options)


def from_dict(group: Type[T], values: Dict[str, Any]) -> T:
    """Rebuilds `group` from a stored dict, ignoring keys that no longer exist."""
    names = {f.name for f in dataclasses.fields(group)}
    return group(**{k: v for k, v in values.items() if k in names})
