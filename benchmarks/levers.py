"""What each speed lever of the performance issue buys, measured side by side in one process.

usage: python benchmarks/levers.py [--model CKPT] [--studies DIR] [--repeats 3] [--compile] [--output FILE.json]

Every lever runs the same network on the same preprocessed volumes; timings are medians over
interleaved repeats (lever order rotates each round, so load on a shared machine hits all alike), and
every lever's held-out Dice is reported next to its time, because a faster path that changes the
segmentation is not the same product. Levers:

- ``eager``: the library default (fp32, contiguous, ``torch.inference_mode``), the reference.
- ``channels_last``: network and inputs in channels-last memory format.
- ``bf16``: CPU autocast to bfloat16.
- ``compile``: ``torch.compile`` of the per-step forward (compile time reported separately; only
  with ``--compile``: it took 12 minutes to compile here and then ran slower than eager).
- ``onnxruntime``: the per-step forward exported to ONNX and run by ONNX Runtime (when installed).
- ``threads1``: one intra-op thread instead of all cores.
- ``steps{1,2,4,8}``: DDIM steps; ``samples{3,5}``: ensemble size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monai_segdiff import data, metrics
from monai_segdiff.bench import preprocessed_case
from monai_segdiff.config import load_checkpoint
from monai_segdiff.diffusion.inferer import SegDiffInferer
from monai_segdiff.diffusion.sampler import DiffusionSampler
from monai_segdiff.networks import build_network

REPO = Path(__file__).resolve().parents[1]


class StepWrapper(torch.nn.Module):
    """The network with ``forward`` replaced by another per-step callable (compiled / ONNX)."""

    def __init__(self, net, step_fn):
        super().__init__()
        self.net, self.step_fn = net, step_fn

    def condition(self, image):
        return self.net.condition(image)

    def forward(self, x_t, t, cond):
        return self.step_fn(x_t, t, cond)


def onnx_step(net, cfg, size: int = 64):
    """Export ``net.forward(x_t, t, cond)`` with dynamic batch and size; return a callable on ORT."""
    import onnxruntime as ort

    img = torch.randn(2, cfg.in_channels, size, size)
    cond = net.condition(img)
    flat = list(cond) if isinstance(cond, (list, tuple)) else [cond]
    x = torch.randn(2, cfg.num_classes, size, size)
    t = torch.full((2,), 500, dtype=torch.long)
    names = ["x_t", "t"] + [f"c{i}" for i in range(len(flat))]

    class Flat(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x_t, t, *c):
            return self.n(x_t, t, list(c) if isinstance(cond, (list, tuple)) else c[0])

    path = Path("/tmp/segdiff_step.onnx")
    dyn = {n: {0: "b", 2: f"h_{n}", 3: f"w_{n}"} for n in names if n != "t"}
    dyn["t"] = {0: "b"}
    torch.onnx.export(Flat(net), (x, t, *flat), str(path), input_names=names, output_names=["out"],
                      dynamic_axes=dyn, opset_version=18, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def step(x_t, t, c):
        cs = list(c) if isinstance(c, (list, tuple)) else [c]
        feeds = {"x_t": x_t.numpy(), "t": t.numpy(), **{f"c{i}": v.numpy() for i, v in enumerate(cs)}}
        return torch.from_numpy(sess.run(None, feeds)[0])

    return step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "apps/segdiff/model/segdiff.pt"))
    ap.add_argument("--studies", default=str(REPO / "sample-data/phantoms"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile)")
    ap.add_argument("--output")
    args = ap.parse_args()

    state, cfg, _ = load_checkpoint(args.model)
    net = build_network(cfg)
    net.load_state_dict(state)
    net.eval()
    _, val = data.split(data.labelled(data.datalist(args.studies)), 0.2, seed=0)
    cases = [preprocessed_case(cfg, it) for it in val[: args.cases]]
    threads = torch.get_num_threads()

    def run(model, steps=None, samples=None, autocast=False, channels_last=False, nthreads=threads):
        sampler = DiffusionSampler(cfg, steps=steps)
        fn = sampler.probabilities
        if channels_last:
            fn = lambda n, b, k, g: sampler.probabilities(n, b.contiguous(memory_format=torch.channels_last), k, g)  # noqa: E731
        inf = SegDiffInferer(fn, samples or cfg.num_samples, cfg.num_classes, 2, cfg.context, cfg.divisor, seed=0)
        torch.set_num_threads(nthreads)
        t0 = time.perf_counter()
        dice = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for img, lab in cases:
                pred = inf(img, model).probs.argmax(0)
                dice.append(np.nanmean(metrics.dice_per_label(pred, lab, cfg.num_classes)))
        torch.set_num_threads(threads)
        return time.perf_counter() - t0, float(np.mean(dice))

    levers = {
        "eager": lambda: run(net),
        "channels_last": lambda: run(cl_net, channels_last=True),
        "bf16": lambda: run(net, autocast=True),
        "threads1": lambda: run(net, nthreads=1),
        **{f"steps{s}": (lambda s=s: run(net, steps=s)) for s in (1, 2, 8)},
        "samples3": lambda: run(net, samples=3),
    }
    import copy

    cl_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    notes = {}
    try:
        if not args.compile:
            raise RuntimeError("not run (pass --compile)")
        t0 = time.perf_counter()
        compiled = StepWrapper(net, torch.compile(net.forward, dynamic=True))
        run(compiled)  # warm-up compiles
        notes["compile_seconds"] = time.perf_counter() - t0
        levers["compile"] = lambda: run(compiled)
    except Exception as e:  # report, don't hide: the lever is then "not available here"
        notes["compile_error"] = str(e).splitlines()[0][:300]
    try:
        import onnxruntime  # noqa: F401

        ort_net = StepWrapper(net, onnx_step(net, cfg))
        run(ort_net)
        levers["onnxruntime"] = lambda: run(ort_net)
    except Exception as e:
        notes["onnxruntime_error"] = str(e).splitlines()[0][:300]

    names = list(levers)
    times = {n: [] for n in names}
    dice = {}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t, d = levers[n]()
            times[n].append(t)
            dice[n] = d
            print(f"[levers] round {r} {n}: {t:.2f} s, Dice {d:.3f}", file=sys.stderr, flush=True)
    base = statistics.median(times["eager"])
    table = {n: {"median_seconds": statistics.median(times[n]), "speedup_vs_eager": base / statistics.median(times[n]),
                 "dice": dice[n], "dice_delta_vs_eager": dice[n] - dice["eager"]} for n in names}
    out = {"settings": {"model": args.model, "cases": [it["id"] for it in val[: args.cases]],
                        "volume_shapes": [list(c[0].shape[1:]) for c in cases], "repeats": args.repeats,
                        "threads": threads, "samples": cfg.num_samples, "steps": cfg.sample_steps,
                        "torch": torch.__version__},
           "levers": table, **notes}
    text = json.dumps(out, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    print("\n| lever | median s | speed-up | Dice | ΔDice |\n|---|---|---|---|---|")
    for n, v in table.items():
        print(f"| {n} | {v['median_seconds']:.2f} | {v['speedup_vs_eager']:.2f}x | {v['dice']:.3f} | "
              f"{v['dice_delta_vs_eager']:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
