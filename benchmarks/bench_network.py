"""Times the flow backbone (PWC-Net) and the weighting head (MaskNet) against the literal reference.

At 640x448 on CPU, per frame pair: the reference (``tests/reference/pwcnet_reference.py``: the
81-displacement cost-volume loop, NCHW, autograd recording as in the reference's training-mode
modules, i.e. weights that require grad and no inference mode) and ours (``model.pwcnet``,
``model.masknet``) with and without ``torch.inference_mode()``. All variants run round-robin in
the same process and rounds, so a load from other processes hits them alike; each figure is the
median over rounds. Prints a table, then the agreement of the outputs, and last
``speedup_vs_reference=X``: (reference backbone + head) / (ours in inference mode, backbone + head).

    python benchmarks/bench_network.py --repeats 10 --threads 2
"""
import argparse
import os
import statistics
import time

import torch

from model.masknet import MaskNet
from model.pwcnet import PWCNet
from tests.reference.reference_weights import deterministic_reference_state_dict, split_tracker_state_dict
from tests.reference import pwcnet_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_JSON = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "nnrt_reference", "state_dict_shapes.json")
HEIGHT, WIDTH = 448, 640


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed rounds after one warm-up round; each variant runs once per round (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value (default 2)")
    return parser.parse_args()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = pwcnet_reference
    flow_state, mask_state = split_tracker_state_dict(deterministic_reference_state_dict(SHAPES_JSON))
    flow_net, mask_net = PWCNet().eval(), MaskNet().eval()
    flow_net.load_state_dict(flow_state)
    mask_net.load_state_dict(mask_state)
    # The reference's modules hold parameters that require grad; so do its weights here.
    ref_flow = {k: v.clone().requires_grad_() for k, v in flow_state.items()}
    ref_mask = {k: v.clone().requires_grad_() for k, v in mask_state.items()}

    source, target = torch.rand(1, 3, HEIGHT, WIDTH), torch.rand(1, 3, HEIGHT, WIDTH)
    aux = torch.randn(1, 12, HEIGHT, WIDTH)
    features2 = flow_net(source, target)[5].detach()

    def ours_backbone():
        return flow_net(source, target)

    def ours_head():
        return mask_net(features2, aux)

    def inference(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    variants = {
        ("reference", "backbone"): lambda: reference.pwcnet_reference(ref_flow, source, target),
        ("reference", "head"): lambda: reference.masknet_reference(ref_mask, features2, aux),
        ("ours, autograd", "backbone"): ours_backbone,
        ("ours, autograd", "head"): ours_head,
        ("ours, inference_mode", "backbone"): inference(ours_backbone),
        ("ours, inference_mode", "head"): inference(ours_head),
    }
    times = {key: [] for key in variants}
    outputs = {}
    for round_index in range(args.repeats + 1):
        for key, fn in variants.items():
            seconds, result = timed(fn)
            if round_index > 0:
                times[key].append(seconds)
            if round_index == args.repeats:
                # Detached, so that no autograd graph stays alive while the others run.
                outputs[key] = [t.detach() for t in result] if isinstance(result, tuple) else result.detach()
            del result
    median = {key: statistics.median(values) for key, values in times.items()}

    print(f"PWC-Net + MaskNet at {WIDTH}x{HEIGHT}, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} rounds (s per pair)")
    print(f"{'variant':24s} {'backbone':>9s} {'head':>9s} {'total':>9s} {'speedup':>8s}")
    ref_total = median[("reference", "backbone")] + median[("reference", "head")]
    for name in ("reference", "ours, autograd", "ours, inference_mode"):
        backbone, head = median[(name, "backbone")], median[(name, "head")]
        print(f"{name:24s} {backbone:9.3f} {head:9.3f} {backbone + head:9.3f} {ref_total / (backbone + head):7.2f}x")
    ref_out, our_out = outputs[("reference", "backbone")], outputs[("ours, inference_mode", "backbone")]
    flow_diff = max(float((a - b).abs().max()) for a, b in zip(ref_out[:5], our_out[:5]))
    mask_diff = float((outputs[("reference", "head")] - outputs[("ours, inference_mode", "head")]).abs().max())
    print(f"max |ours - reference|: flows {flow_diff:.2e}, mask {mask_diff:.2e}")
    ours_total = median[("ours, inference_mode", "backbone")] + median[("ours, inference_mode", "head")]
    print(f"speedup_vs_reference={ref_total / ours_total:.2f}")


if __name__ == "__main__":
    main()
