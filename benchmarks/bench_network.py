"""Times the flow backbone (PWC-Net) and the weighting head (MaskNet) against the literal reference.

At 640x448 on CPU, per frame pair: the reference (``tests/reference/pwcnet_reference.py``: the
81-displacement cost-volume loop, NCHW) and ours (``model.pwcnet``, ``model.masknet``), each
twice: recording autograd (weights that require grad, as in training) and in
``torch.inference_mode()`` (as at test time). All variants run round-robin in the same process
and rounds, so a load from other processes hits them alike; each figure is the median over
rounds. Prints a table with each variant's speedup against the reference *in the same mode*, the
agreement of the outputs, and last ``speedup_vs_reference=X``: reference / ours, backbone + head,
both in inference mode (like with like).

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
        ("reference, autograd", "backbone"): lambda: reference.pwcnet_reference(ref_flow, source, target),
        ("reference, autograd", "head"): lambda: reference.masknet_reference(ref_mask, features2, aux),
        ("reference, inference_mode", "backbone"):
            inference(lambda: reference.pwcnet_reference(flow_state, source, target)),
        ("reference, inference_mode", "head"):
            inference(lambda: reference.masknet_reference(mask_state, features2, aux)),
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
    print(f"{'variant':27s} {'backbone':>9s} {'head':>9s} {'total':>9s} {'vs reference, same mode':>24s}")
    total = {name: median[(name, "backbone")] + median[(name, "head")]
             for name in {key[0] for key in variants}}
    for mode in ("autograd", "inference_mode"):
        for name in (f"reference, {mode}", f"ours, {mode}"):
            backbone, head = median[(name, "backbone")], median[(name, "head")]
            ratio = total[f"reference, {mode}"] / total[name]
            print(f"{name:27s} {backbone:9.3f} {head:9.3f} {total[name]:9.3f} {ratio:23.2f}x")
    ref_out = outputs[("reference, inference_mode", "backbone")]
    our_out = outputs[("ours, inference_mode", "backbone")]
    flow_diff = max(float((a - b).abs().max()) for a, b in zip(ref_out[:5], our_out[:5]))
    mask_diff = float((outputs[("reference, inference_mode", "head")]
                       - outputs[("ours, inference_mode", "head")]).abs().max())
    print(f"max |ours - reference|: flows {flow_diff:.2e}, mask {mask_diff:.2e}")
    print(f"speedup_vs_reference={total['reference, inference_mode'] / total['ours, inference_mode']:.2f}")


if __name__ == "__main__":
    main()
