"""Activation memory of a training iteration, counted on the ``meta`` device (no compute, any size).

What autograd keeps for backward is most of a training iteration's memory at large crops. This script builds
the benchmark's model (DeepLabV3, ResNet body, output stride 16, VOC 15-5 at the given step, as
``bench_train.py``) on the ``meta`` device, runs one training-mode forward and sums the distinct storages
saved for backward, for our layer, our layer with ``--recompute_abn`` (in-place ABN's output-only scheme)
and the plain-PyTorch baseline (``nn.BatchNorm2d`` + LeakyReLU). It also prints the gradient and momentum
bytes of SGD. The figures are float32 (autocast halves most of the activations); on the CPU they match a
real run (ResNet-101, crop 256, batch 4: 0.93 / 0.81 GiB counted on meta, 957 / 829 MiB measured).

    python benchmarks/bench_memory.py --crop 512 --batch 12          # the reference's GPU setting
    python benchmarks/bench_memory.py --smoke --json                 # CI
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_paths()
import testing  # noqa: E402  (the step builders the tests use too)

GIB = float(1 << 30)
VARIANTS = {  # name -> (norm_act, abn)
    "ours": ("iabn_sync", "torch"),
    "ours --recompute_abn": ("iabn_sync", "recompute"),
    "baseline": ("std", "torch"),
}


def saved_bytes(backbone: str, crop: int, batch: int, step: int, norm_act: str, abn: str) -> dict[str, float]:
    """Bytes kept for backward by one training forward of the current model, and its parameter bytes."""
    import torch

    opts = testing.build_opts(
        step=step, backbone=backbone, crop=crop, batch=batch, device="cpu", norm_act=norm_act, abn=abn
    )
    with torch.device("meta"):
        model, _ = testing.build_models(opts, step, torch.device("meta"))
        model.train()
        images = torch.empty(batch, 3, crop, crop)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Keyed by the storage object, not the (meta: always 0) data pointer: views share one entry.
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"saved": float(sum(storages.values())), "params": float(params)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=common.BACKBONES)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--smoke", action="store_true", help="CI mode: resnet18, crop 64, batch 2")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.crop, args.batch = "resnet18", 64, 2

    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    for step in args.steps:
        measured = {}
        for name, (norm_act, abn) in VARIANTS.items():
            measured[name] = saved_bytes(args.backbone, args.crop, args.batch, step, norm_act, abn)
        baseline = measured["baseline"]["saved"]
        for name, m in measured.items():
            # SGD with momentum: gradients + momentum buffers (the parameters are among the saved tensors).
            state = 2 * m["params"]
            results.append(
                {"step": step, "variant": name, "saved_bytes": m["saved"], "param_bytes": m["params"],
                 "ratio_to_baseline": m["saved"] / baseline}
            )  # fmt: skip
            rows.append([step, name, m["saved"] / GIB, m["saved"] / args.batch / 2**20, state / GIB,
                         (m["saved"] + state) / GIB, m["saved"] / baseline])  # fmt: skip
    payload = {"config": vars(args), "results": results}
    common.write_json(payload, args.json_out)
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
        return 0
    print(
        f"bench_memory  backbone={args.backbone} OS16  crop={args.crop}  batch={args.batch}  float32, "
        "counted on the meta device"
    )
    print(
        common.format_table(
            ["step", "variant", "saved GiB", "saved MiB/img", "grads+momentum GiB", "sum GiB",
             "saved / baseline"],
            rows,
        )
    )  # fmt: skip
    print(
        "saved = distinct storages autograd keeps for backward in one training forward, the parameters "
        "included (step > 0: the old model runs under no_grad and keeps nothing). Not counted: the "
        "transient tensors of backward, the old model's forward peak, allocator caching and cuDNN workspaces."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
