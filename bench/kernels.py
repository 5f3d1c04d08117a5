"""Benchmark of ueguard's fused kernels against their eager PyTorch references, in the same run.

For each op and shape (256×3×32×32 and 64×3×224×224): the C++ CPU operator vs the reference on
CPU tensors, and — when CUDA is present — the Triton kernel vs the reference on the GPU. Prints
median time, spread and the speedup (reference ÷ fused), and each fused op's effective bandwidth
(its minimal bytes moved ÷ time) as a fraction of the device's measured copy bandwidth — the GPU
target is ≥ 80 % for project_step and augment at large batch; ``--json FILE`` writes one record per
(op, shape, device) with ``speedup``, ``gbps``, ``copy_gbps`` and ``fraction_of_copy``. Needs no data set.

    python bench/kernels.py [--quick] [--isa auto|all|avx512,avx2,default] [--json bench/results/kernels-cpu.json]
                            [--devices cpu,cuda] [--shapes 256x3x32x32,64x3x224x224] [--copy-mib 256]

``--devices cuda`` times the GPU alone (a GPU machine's CPU numbers are not what it is run for);
``--interpreted-triton`` adds the Triton kernels on CPU tensors through the interpreter (``TRITON_INTERPRET=1``;
a smoke test of that path at toy shapes — its timings mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import command_line, environment, measure, write_json  # noqa: E402

from ueguard.kernels import _ext, apply_quantize, augment, project_step, use_backend  # noqa: E402

SHAPES = [(256, 3, 32, 32), (64, 3, 224, 224)]

#: Bytes each op must move per element at least — every input read once, every output written once —
#: for its effective bandwidth (GB/s), compared with the device's own measured copy bandwidth.
#: L2 reads its inputs more than once by construction (norms first); the figure is still the minimum.
BYTES_PER_ELEMENT = {
    "project_step_linf": 4 * 3 + 4,             # delta, grad, x → delta'
    "project_step_linf+next_bf16_cl": 4 * 3 + 4 + 2,  # + x + delta' in bf16
    "project_step_l2": 4 * 3 + 4,
    "augment_u8_normalise": 1 + 4,             # uint8 in → float32 out
    "augment_f32_reflect": 4 + 4,
    "augment_fwd+bwd_f32": (4 + 4) + (4 + 4),  # forward, then the adjoint
    "apply_quantize": 1 + 4 + 1,               # image, delta → uint8 (per-image stats are negligible)
}


def copy_bandwidth(device: str, warmup: int, repeat: int, mib: int = 256) -> float:
    """The device's copy bandwidth in GB/s (read + write of a ``mib``-MiB float32 tensor), measured the
    same way as the ops: the ceiling a memory-bound kernel can approach."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device=device, warmup=warmup, repeat=repeat)
    return 2 * src.numel() * 4 / timing["median_s"] / 1e9
EPS, STEP = 8 / 255, 2 / 255
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def cases(shape, device: str):
    """(op name, callable) pairs; each callable runs the op on whichever backend is active."""
    gen = torch.Generator().manual_seed(0)
    n, c, h, w = shape
    x = torch.rand(shape, generator=gen).to(device)
    delta = ((2 * torch.rand(shape, generator=gen) - 1) * EPS).to(device)
    grad = torch.randn(shape, generator=gen).to(device)
    image = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    pad = max(1, h // 8)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).to(device)
    flips = (torch.rand(n, generator=gen) < 0.5).to(device)
    mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)
    x_grad = x.clone().requires_grad_(True)
    grad_out = torch.randn(shape, generator=gen).to(device)

    def augment_backward():
        out = augment(x_grad, offsets, flips, pad=pad, mean=mean, std=std)
        (g,) = torch.autograd.grad(out, x_grad, grad_out)
        return g

    return [
        ("project_step_linf", lambda: project_step(delta, grad, x, STEP, EPS)),
        ("project_step_linf+next_bf16_cl", lambda: project_step(delta, grad, x, STEP, EPS, input_dtype=torch.bfloat16,
                                                                 input_channels_last=True)),
        ("project_step_l2", lambda: project_step(delta, grad, x, 0.1, 0.5, norm="l2")),
        ("augment_u8_normalise", lambda: augment(image, offsets, flips, pad=pad, mean=mean, std=std)),
        ("augment_f32_reflect", lambda: augment(x, offsets, flips, pad=pad, padding="reflect")),
        ("augment_fwd+bwd_f32", augment_backward),
        ("apply_quantize", lambda: apply_quantize(image, delta)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (3 warm-up, 5 timed)")
    parser.add_argument("--json", metavar="FILE", help="write the records to FILE")
    parser.add_argument("--devices", default="cpu,cuda",
                        help="comma list of devices to time (default cpu,cuda: the CPU and, when present, the GPU)")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                        help="comma list of NxCxHxW shapes (default %(default)s)")
    parser.add_argument("--copy-mib", type=int, default=256, help="size of the copy-bandwidth probe (MiB)")
    parser.add_argument("--interpreted-triton", action="store_true",
                        help="also run the Triton kernels on CPU tensors (TRITON_INTERPRET=1; smoke test only)")
    parser.add_argument("--isa", default="auto",
                        help="instruction set(s) of the C++ kernels: auto (the one chosen at load, the widest the "
                             "CPU runs), all, or a comma list of avx512, avx2, default")
    args = parser.parse_args(argv)
    warmup, repeat = (2, 5) if args.quick else (3, 15)
    devices = {d.strip() for d in args.devices.split(",") if d.strip()}
    if devices - {"cpu", "cuda"}:
        parser.error(f"--devices: unknown {', '.join(sorted(devices - {'cpu', 'cuda'}))} (choose from cpu, cuda)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    targets = []
    if "cpu" in devices:
        if _ext.cpp_available():
            isas = {"auto": [_ext.cpu_isa()], "all": _ext.cpu_isas()}.get(args.isa, args.isa.split(","))
            targets = [("cpu", "cpp", isa) for isa in isas]
        else:
            print(f"C++ extension unavailable: {_ext.cpp_unavailable_reason()}")
    if args.interpreted_triton:
        from ueguard.kernels import project

        if project.triton is None or not project._TRITON_INTERPRETED:
            parser.error("--interpreted-triton needs triton and TRITON_INTERPRET=1 set before triton is imported")
        targets.append(("cpu", "triton", None))
    if "cuda" in devices and torch.cuda.is_available():
        targets.append(("cuda", "triton", None))
    if not targets:
        print("nothing to time: no C++ extension, no CUDA device, or --devices excluded them")
    env = environment()
    print(f"# {env}")
    records = []
    header = f"{'op':32} {'shape':>18} {'device':>6} {'isa':>7} {'fused ms':>10} {'ref ms':>10} {'speedup':>8}"
    print(header)
    copy_gbps = {device: copy_bandwidth(device, warmup, repeat, args.copy_mib) for device in {t[0] for t in targets}}
    for device, gbps in copy_gbps.items():
        print(f"# {device} copy bandwidth: {gbps:.1f} GB/s")
    for device, backend, isa in targets:
        for shape in shapes:
            for name, fn in cases(shape, device):
                with use_backend(backend), (_ext.use_cpu_isa(isa) if isa else contextlib.nullcontext()):
                    fused = measure(fn, device=device, warmup=warmup, repeat=repeat)
                with use_backend("reference"):
                    ref = measure(fn, device=device, warmup=warmup, repeat=repeat)
                speedup = ref["median_s"] / fused["median_s"]
                gbps = BYTES_PER_ELEMENT[name] * math.prod(shape) / fused["median_s"] / 1e9
                records.append({"op": name, "shape": list(shape), "device": device, "backend": backend, "isa": isa,
                                "fused": fused, "reference": ref, "speedup": speedup, "gbps": gbps,
                                "copy_gbps": copy_gbps[device], "copy_mib": args.copy_mib, "fraction_of_copy": gbps / copy_gbps[device]})
                print(f"{name:32} {'x'.join(map(str, shape)):>18} {device:>6} {isa or backend:>7} {fused['median_s'] * 1e3:10.3f} "
                      f"{ref['median_s'] * 1e3:10.3f} {speedup:8.2f} {gbps:8.1f} GB/s "
                      f"({gbps / copy_gbps[device]:.0%} of copy)", flush=True)
            if args.json:  # after every shape, so a run stopped at a time limit keeps what it measured
                write_json(args.json, records, command_line(__file__, argv))
    if args.json:
        write_json(args.json, records, command_line(__file__, argv))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
