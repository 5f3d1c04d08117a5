"""Benchmark of ueguard's engine: PGD generation throughput against the authors'-style eager loop, the
distance to the surrogate's own forward + input-gradient cost, a whole-run slice, a projection for
ImageNet-1k, and a bf16-vs-fp32 efficacy check. Needs no data set (synthetic images; the efficacy check
uses scikit-learn's bundled digits).

    python bench/engine.py [--quick] [--json bench/results/engine-cpu.json] [--device cpu|cuda]
                           [--batch N] [--steps K] [--repeat R]   (override the preset's sizes: smoke runs)

Cases: EMN and SSC inner loops at 32 px (``resnet18_cifar``, ueguard's default there) and 224 px
(timm ``resnet18``, ueguard's default above 64 px), random weights, one batch.

1. **Throughput** (images × PGD steps / s). *Eager baseline*, written here the way the authors' code
   does it: fp32, contiguous NCHW model and batch, ``loss.backward()`` with the surrogate's parameters
   requiring gradients (so weight gradients are computed too), the step as separate sign / add / clamp
   ops, and the surrogate's batch accuracy read with ``.item()`` every step. *Engine*: the method's own
   PGD pass (``EMN._samplewise_pgd``, ``SSC._pgd``) under a :class:`Runtime` — channels-last, the fused
   ``project_step``, parameters frozen, no host reads — in fp32 (the CPU default) and in bf16 autocast;
   compiled when ``--compile`` resolves to on. ``speedup`` = eager time ÷ engine time, same batch, same
   process, measurements interleaved.
2. **Limit**: one PGD step costs at least a forward plus an input-gradient backward through the
   networks of the objective (EMN: the surrogate; SSC: the frozen-shallow path, the from-scratch path and
   the prior's stages). Those are timed bare (no projection, no loss extras) in fp32 NCHW, fp32
   channels-last and bf16 channels-last; ``limit_ratio`` = engine step time ÷ the fastest of them.
   **Whole-run slice**: one EMN round on a small synthetic set (surrogate SGD steps, the PGD pass over the
   set, the stop-criterion evaluation, the uint8 → float data movement), timed end to end; its
   throughput is compared with the PGD-only throughput.
5. **ImageNet-1k projection** (1,281,167 images) for EMN and SSC from the 224-px throughputs — see
   :func:`projection` for the formula and assumptions. GPU numbers only when run with ``--device cuda``;
   otherwise those cells say "not yet measured".
E. **Efficacy at reduced precision**: EMN (sample-wise, quick budget) generated in fp32 and in bf16 on
   scikit-learn digits; a fresh victim (fp32) trained on each protected set and on the clean set;
   test accuracy reported (lower = protection held).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import command_line, _sync, environment, interleaved_times, write_json  # noqa: E402

from ueguard.data.working_set import WorkingSet  # noqa: E402
from ueguard.engine.compiled import frozen_parameters, model_call  # noqa: E402
from ueguard.engine.runtime import Runtime  # noqa: E402
from ueguard.methods import create_method  # noqa: E402
from ueguard.methods.ssc import _reinitialise, out_of_subspace_ratio  # noqa: E402
from ueguard.models import create_model  # noqa: E402

EPS = 8 / 255
ALPHA = 0.2 * EPS        # the standard budget's step (step_fraction 0.2)
CLASSES = 10
IMAGENET_IMAGES = 1_281_167
ARCH = {32: "resnet18_cifar", 224: "resnet18"}


# ------------------------------------------------------------------------------------------ timing

def interleaved(fns: dict, *, device: str, warmup: int, repeat: int) -> dict:
    """Time several callables round-robin (:func:`_timing.interleaved_times`); seconds per call, median and
    spread per name."""
    out = {}
    for name, ts in interleaved_times(fns, device=device, warmup=warmup, repeat=repeat).items():
        ts.sort()
        out[name] = {"median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1],
                     "iqr_s": ts[(3 * len(ts)) // 4] - ts[len(ts) // 4], "repeat": repeat, "warmup": warmup}
    return out


def synthetic_set(n: int, size: int, seed: int = 0) -> WorkingSet:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    return WorkingSet(images, torch.arange(n) % CLASSES, torch.zeros(n, dtype=torch.bool),
                      tuple(map(str, range(CLASSES))), [str(i) for i in range(n)])


# ------------------------------------------------------------------------------- eager baselines

def eager_emn_pass(model, images_u8, y, steps: int):
    """EMN's min-min PGD pass as the authors' code writes it (fp32, NCHW, plain autograd)."""
    x = images_u8.float() / 255
    delta = torch.zeros_like(x)
    for _ in range(steps):
        x_adv = (x + delta).detach().requires_grad_(True)
        model.zero_grad()
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        acc = (logits.argmax(1) == y).sum().item() / len(y)  # noqa: F841 — the authors log it every step
        x_new = x_adv.detach() - ALPHA * x_adv.grad.sign()
        delta = torch.clamp(x_new - x, -EPS, EPS)
        delta = torch.clamp(x + delta, 0, 1) - x
    return delta


def eager_ssc_pass(nets, images_u8, y, steps: int, stages, bases, w: float = 0.5, lam: float = 1.0):
    """SSC's PGD pass written the straightforward way: same objective, fp32, NCHW, loss.backward()."""
    frozen, scratch, prior = nets
    x = images_u8.float() / 255
    with torch.no_grad():
        clean = prior.forward_stages(x, stages)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        x_adv = (x + delta).detach().requires_grad_(True)
        frozen.zero_grad()
        scratch.zero_grad()
        loss = w * F.cross_entropy(frozen(x_adv), y) + (1 - w) * F.cross_entropy(scratch(x_adv), y)
        feats = prior.forward_stages(x_adv, stages)
        ratio = torch.stack([out_of_subspace_ratio(feats[s] - clean[s], bases[s]) for s in stages]).mean()
        (loss + lam * ratio).backward()
        print_value = loss.item()  # noqa: F841
        x_new = x_adv.detach() - ALPHA * x_adv.grad.sign()
        delta = torch.clamp(x_new - x, -EPS, EPS)
        delta = torch.clamp(x + delta, 0, 1) - x
    return delta


# ------------------------------------------------------------------------------------------ cases

def make_emn(rt: Runtime, arch: str, steps: int, batch: int):
    torch.manual_seed(0)
    method = create_method("emn", runtime=rt, surrogate=create_model(arch, CLASSES), pgd_steps=steps,
                           step_fraction=0.2, batch_size=batch)
    model = rt.prepare_model(method.surrogate).eval()
    return method, model


def make_ssc(rt: Runtime, arch: str, steps: int, batch: int, data: WorkingSet):
    """SSC's networks and subspaces set up as ``SSC.generate`` does (random weights: timing only)."""
    torch.manual_seed(0)
    method = create_method("ssc", runtime=rt, surrogate=create_model(arch, CLASSES), pgd_steps=steps,
                           step_fraction=0.2, batch_size=batch, pca_images=batch,
                           perturbation="samplewise",  # the eager loop's δ: one row per image
                           deception_weight=0)  # the eager loop is plain SSC: no fitted deception head
    frozen = rt.prepare_model(method.surrogate)
    shallow, _ = method._split(frozen)
    prior = copy.deepcopy(frozen).eval().requires_grad_(False)
    scratch = rt.prepare_model(_reinitialise(frozen, 0))
    for p in shallow.parameters():
        p.requires_grad_(False)
    bases, _, _ = method._subspaces(prior, data.to(rt.device))  # no anchors: anchor_weight is 0
    frozen.eval()
    scratch.eval()
    return method, (frozen, scratch, prior), bases


def bare_limit(nets, x, y, rt: Runtime, stages=None):
    """Forward + input-gradient backward through the objective's networks, nothing else."""
    xa = x.detach().requires_grad_(True)
    with frozen_parameters(*nets), rt.autocast():
        loss = F.cross_entropy(model_call(nets[0], rt)(xa).float(), y)
        if stages is not None:
            loss = loss + F.cross_entropy(model_call(nets[1], rt)(xa).float(), y)
            feats = model_call(nets[2], rt, "forward_stages")(xa, stages)
            loss = loss + sum(f.float().square().mean() for f in feats.values())
        (grad,) = torch.autograd.grad(loss, xa)
    return grad


def as_nchw(nets):
    return tuple(copy.deepcopy(n).to(memory_format=torch.contiguous_format) for n in nets)


def run_case(method_name: str, size: int, batch: int, steps: int, device: str, compile_: str, warmup: int,
             repeat: int, precisions) -> list[dict]:
    """Records of one (method, size) case, per precision — and per compile setting with ``compile_="both"``,
    which times the compiled and the eager engine (and bare limits) interleaved in the same run, adding
    ``compile_speedup`` (eager engine time ÷ compiled engine time) to the compiled records."""
    arch = ARCH[size]
    data = synthetic_set(batch, size)
    dev = torch.device(device)
    images, labels = data.images.to(dev), data.labels.to(dev)
    on_device = data.to(dev)
    idx = torch.arange(batch)
    both = compile_ == "both"
    settings = [(prec, c) for prec in precisions for c in (("off", "on") if both else (compile_,))]
    suffix = {c: ("_compiled" if both and c == "on" else "") for _, c in settings}
    fns, limit_fns, records = {}, {}, []
    runtimes = {(prec, c): Runtime.create(device, prec, c) for prec, c in settings}
    base_rt = Runtime.create(device, "fp32", "off", channels_last=False)
    if method_name == "emn":
        for (prec, c), rt in runtimes.items():
            method, model = make_emn(rt, arch, steps, batch)
            delta0 = torch.zeros(batch, 3, size, size, device=dev)
            fns[f"engine_{prec}{suffix[c]}"] = (lambda m=method, mod=model, d=on_device, z=delta0:
                                                m._samplewise_pgd(mod, d, z, idx))
        eager_model = as_nchw((model,))[0].train(False).requires_grad_(True)
        fns["eager"] = lambda: eager_emn_pass(eager_model, images, labels, steps)
        nets, stages = (model,), None
    else:
        for (prec, c), rt in runtimes.items():
            method, nets, bases = make_ssc(rt, arch, steps, batch, data)
            delta0 = torch.zeros(batch, 3, size, size, device=dev)
            fns[f"engine_{prec}{suffix[c]}"] = (lambda m=method, n=nets, b=bases, d=on_device, z=delta0:
                                                m._pgd(*n, b, None, d, z, idx))
        stages = method.config.stages
        eager_nets = as_nchw(nets)
        for net in eager_nets[:2]:
            for p in net.parameters():
                p.requires_grad_(True)  # the straightforward loop does not freeze the shallow part either
        fns["eager"] = lambda: eager_ssc_pass(eager_nets, images, labels, steps, stages, bases)
    # the limit: bare forward + input-gradient backward in three configurations (each compiled too with "both")
    x_cl = runtimes[settings[0]].to_float(images)
    limit_configs = {"fp32_nchw": (base_rt, as_nchw(nets), images.float().div(255))}
    for c in dict.fromkeys(c for _, c in settings):
        limit_configs[f"fp32_cl{suffix[c]}"] = (Runtime.create(device, "fp32", c), nets, x_cl)
        if "bf16" in precisions:
            limit_configs[f"bf16_cl{suffix[c]}"] = (Runtime.create(device, "bf16", c), nets, x_cl)
    for name, (rt, ns, x) in limit_configs.items():
        limit_fns[f"limit_{name}"] = lambda rt=rt, ns=ns, x=x: bare_limit(ns, x, labels, rt, stages)
    timed = interleaved({**fns, **limit_fns}, device=device, warmup=warmup, repeat=repeat)
    limits = {k[len("limit_"):]: v["median_s"] for k, v in timed.items() if k.startswith("limit_")}
    fastest = min(limits, key=limits.get)
    eager_s = timed["eager"]["median_s"]
    for prec, c in settings:
        engine_s = timed[f"engine_{prec}{suffix[c]}"]["median_s"]
        record = {
            "bench": "pgd", "method": method_name, "size": size, "arch": arch, "batch": batch, "pgd_steps": steps,
            "device": device, "precision": prec, "compile": runtimes[prec, c].compile, "channels_last": True,
            "engine": timed[f"engine_{prec}{suffix[c]}"], "eager": timed["eager"],
            "engine_images_steps_per_s": batch * steps / engine_s, "eager_images_steps_per_s": batch * steps / eager_s,
            "speedup": eager_s / engine_s,
            "limit_step_s": limits, "limit_fastest": fastest,
            "limit_ratio": (engine_s / steps) / limits[fastest]}
        if both and c == "on":
            record["compile_speedup"] = timed[f"engine_{prec}"]["median_s"] / engine_s
        records.append(record)
    return records


def whole_run(size: int, n: int, batch: int, device: str, compile_: str, precision: str, steps: int) -> dict:
    """One EMN round end to end: ``train_steps`` SGD steps, the PGD pass over the set, the stop check."""
    rt = Runtime.create(device, precision, compile_)
    torch.manual_seed(0)
    data = synthetic_set(n, size)
    method = create_method("emn", runtime=rt, surrogate=create_model(ARCH[size], CLASSES), pgd_steps=steps,
                           step_fraction=0.2, batch_size=batch, max_rounds=1, train_steps=10)
    method(synthetic_set(batch, size, seed=1))  # warm-up (and compilation) on another set
    start = time.perf_counter()
    method(data)
    _sync(device)
    seconds = time.perf_counter() - start
    # the PGD pass alone over the same set, right after, so both rates see the same machine load
    model = rt.prepare_model(method.surrogate).eval()
    on_device = data.to(rt.device)
    start = time.perf_counter()
    for first in range(0, n, batch):
        idx = torch.arange(first, min(n, first + batch))
        method._samplewise_pgd(model, on_device, torch.zeros(len(idx), 3, size, size, device=rt.device), idx)
    _sync(device)
    pgd_seconds = time.perf_counter() - start
    return {"bench": "whole_run", "method": "emn", "size": size, "arch": ARCH[size], "images": n, "batch": batch,
            "pgd_steps": steps, "train_steps": 10, "device": device, "precision": precision, "compile": rt.compile,
            "seconds": seconds, "images_steps_per_s": n * steps / seconds, "pgd_pass_seconds": pgd_seconds,
            "pgd_only_images_steps_per_s": n * steps / pgd_seconds, "whole_run_over_pgd_only": pgd_seconds / seconds}


# ------------------------------------------------------------------------------------- projection

def projection(pgd_throughput: float | None, train_throughput_factor: float = 1.0, *, steps: int = 10,
               rounds: int = 15, train_steps: int = 10, batch: int = 128, eval_images: int = 10_000) -> dict:
    """Hours to protect ImageNet-1k (N = 1,281,167 images at 224 px) on one device.

    hours = R · [ N·K / T_pgd  +  S·B·c / T_pgd  +  E·c_eval / T_pgd ] / 3600

    with K PGD steps per image per round (standard budget: 10), R rounds (standard budget's
    ``max_rounds`` = 15, the worst case: EMN stops earlier once the surrogate fits the perturbed data),
    S = 10 surrogate SGD steps of B = 128 images per round, E = 10,000 images in the stop check.
    T_pgd is the measured engine PGD throughput (images × steps / s). Assumed, not measured: an SGD step
    costs c = 1.5 PGD steps (forward + full backward + update vs forward + input backward), an
    evaluation image c_eval = 1/3 of a PGD step (forward only). Decoding/resizing the 1.28 M JPEGs is
    not included (the loading benchmark measures it; with FFCV it overlaps the compute). SSC runs three
    networks per step, which its measured T_pgd already contains.
    """
    if pgd_throughput is None:
        return {"hours": "not yet measured"}
    n = IMAGENET_IMAGES
    per_round = (n * steps + train_steps * batch * 1.5 * train_throughput_factor + eval_images / 3) / pgd_throughput
    return {"hours": rounds * per_round / 3600, "hours_per_round": per_round / 3600}


# --------------------------------------------------------------------------------------- efficacy

def efficacy(quick: bool, victim_augment: bool = False) -> list[dict]:
    """EMN in fp32 and bf16 on digits; victims trained in fp32 on each; test accuracy (lower = held).

    The victim trains without augmentation by default (the setting EMN's generation loop assumes here:
    quick-budget sample-wise EMN does not survive random crop + flip on digits in either precision, which
    would make the comparison say nothing); ``victim_augment`` trains it with crop + flip instead."""
    import numpy as np
    from sklearn.datasets import load_digits

    from ueguard.defenses.base import create_defense
    from ueguard.engine.fit import FitConfig, fit
    from ueguard.engine.runtime import seed_everything

    d = load_digits()
    gen = np.random.default_rng(0)
    order = gen.permutation(len(d.target))
    n_train = 600 if quick else 1200
    train_ids, test_ids = order[:n_train], order[n_train:n_train + 400]
    x = torch.from_numpy(d.images / 16).float()[:, None]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(d.target).long()

    def subset(ids, imgs=images):
        ids_t = torch.from_numpy(ids)
        return WorkingSet(imgs[ids_t], labels[ids_t], torch.ones(len(ids), dtype=torch.bool),
                          tuple(map(str, range(10))), [str(i) for i in ids])

    train, test = subset(train_ids), subset(test_ids)
    fp32 = Runtime.create("cpu", "fp32", "off")
    epochs = 8 if quick else 15
    records = []
    for precision in ("none", "fp32", "bf16"):
        started = time.perf_counter()
        info = {}
        if precision == "none":
            protected = train
        else:
            seed_everything(0)
            method = create_method("emn", budget="quick", runtime=Runtime.create("cpu", precision, "off"),
                                   surrogate=create_model("resnet18_cifar_slim", 10), seed=0,
                                   max_rounds=4 if quick else 8)
            pert = method(train)
            info = {"rounds": pert.info["rounds"], "surrogate_train_accuracy": pert.info["surrogate_train_accuracy"][-1]}
            xp = (train.images.float() / 255 + pert.for_samples(torch.arange(len(train)), train.labels,
                                                                  train.grayscale)).clamp(0, 1)
            protected = WorkingSet(torch.round(xp * 255).to(torch.uint8), train.labels, train.grayscale,
                                   train.classes, train.ids)
        gen_s = time.perf_counter() - started
        generator = seed_everything(0)
        victim = create_model("resnet18_cifar_slim", 10)
        defense = create_defense("none")
        if not victim_augment:
            defense.augment = lambda x, generator: x  # plain training: no crop/flip
        history = fit(victim, protected, test, FitConfig(epochs=epochs, batch_size=32), defense=defense,
                      params=list(victim.parameters()), runtime=fp32, generator=generator)
        records.append({"bench": "efficacy", "data": f"sklearn digits, {n_train} train / 400 test, 16 px",
                        "generation_precision": precision, "victim_epochs": epochs, "victim_batch": 32,
                        "victim": "resnet18_cifar_slim, fp32, " + ("random crop + flip" if victim_augment else "no augmentation"),
                        "victim_test_accuracy": history[-1]["test_accuracy"],
                        "victim_peak_test_accuracy": max(h["test_accuracy"] for h in history),
                        "generation_s": gen_s, **info})
        print(f"efficacy  EMN {precision:>4}: victim test accuracy {history[-1]['test_accuracy']:.3f} "
              f"(peak {records[-1]['victim_peak_test_accuracy']:.3f})", flush=True)
    return records


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats")
    parser.add_argument("--json", metavar="FILE", help="write the records to FILE")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", dest="compile_", default="auto", choices=["auto", "on", "off", "both"],
                        help="the engine's compile setting (auto: off on CPU, on on CUDA; both: the compiled and "
                             "the eager engine timed side by side, with compile_speedup)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=[32, 224])
    parser.add_argument("--methods", nargs="+", default=["emn", "ssc"], choices=["emn", "ssc"])
    parser.add_argument("--skip-efficacy", action="store_true")
    parser.add_argument("--efficacy-only", action="store_true", help="only the bf16-vs-fp32 efficacy check")
    parser.add_argument("--arch32", default=ARCH[32],
                        help="the surrogate at 32 px (default %(default)s; a smaller one such as resnet20_cifar for smoke runs)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="engine precisions to time (default both; bf16 alone halves what --compile both compiles)")
    parser.add_argument("--batch", type=int, help="batch at every size (default: the preset's, see --quick)")
    parser.add_argument("--steps", type=int, help="PGD steps per timed pass (default: the preset's)")
    parser.add_argument("--repeat", type=int, help="timed repeats (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a machine shared "
                        "with other jobs, 1 avoids OpenMP barrier stalls that make multi-thread timings erratic")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ARCH[32] = args.arch32
    cuda = args.device == "cuda"
    if args.quick:
        batch = {32: 8, 224: 2} if not cuda else {32: 256, 224: 64}
        steps, warmup, repeat = 2, 1, 3
    else:
        batch = {32: 128, 224: 16} if not cuda else {32: 512, 224: 128}
        steps, warmup, repeat = 5, 1, 5
    if args.batch:
        batch = {size: args.batch for size in batch}
    steps, repeat = args.steps or steps, args.repeat or repeat
    env = environment()
    print(f"# {env}")
    precisions = tuple(args.precisions)
    records = []

    def save(final: bool = False) -> None:
        """Write what is measured so far (after every case, so a run stopped at a time limit keeps it)."""
        if args.json:
            write_json(args.json, records, command_line(__file__, argv))
            if final:
                print(f"wrote {args.json}")

    if args.efficacy_only:
        args.sizes, args.methods = [], []
    print(f"{'case':22} {'prec':>5} {'compile':>7} {'engine img·step/s':>18} {'eager img·step/s':>17} {'speedup':>8} "
          f"{'limit':>16} {'limit_ratio':>11} {'compile_speedup':>15}")
    for size in args.sizes:
        for method in args.methods:
            for rec in run_case(method, size, batch[size], steps, args.device, args.compile_, warmup, repeat,
                                precisions):
                records.append(rec)
                save()
                print(f"{method + ' ' + str(size) + 'px b' + str(rec['batch']):22} {rec['precision']:>5} "
                      f"{rec['compile']:>7} {rec['engine_images_steps_per_s']:18.1f} "
                      f"{rec['eager_images_steps_per_s']:17.1f} {rec['speedup']:8.2f} {rec['limit_fastest']:>16} "
                      f"{rec['limit_ratio']:11.2f} {rec.get('compile_speedup', float('nan')):15.2f}", flush=True)
    small = min(args.sizes, default=None)
    if small and "emn" in args.methods:
        wr = whole_run(small, 2 * batch[small], batch[small], args.device,
                       "on" if args.compile_ == "both" else args.compile_, "fp32", steps)
        records.append(wr)
        save()
        print(f"whole run (1 EMN round, {wr['images']} images at {small}px, fp32): {wr['seconds']:.1f} s, "
              f"{wr['images_steps_per_s']:.1f} img·step/s = {wr['whole_run_over_pgd_only']:.2f} of the PGD-only rate")
    for method in args.methods:
        rec224 = [r for r in records if r["bench"] == "pgd" and r["method"] == method and r["size"] == 224]
        best = max(rec224, key=lambda r: r["engine_images_steps_per_s"]) if rec224 else None
        cpu_proj = projection(best["engine_images_steps_per_s"]) if best and not cuda else None
        gpu_proj = projection(best["engine_images_steps_per_s"]) if best and cuda else projection(None)
        rec = {"bench": "projection_imagenet1k", "method": method, "images": IMAGENET_IMAGES, "size": 224,
               "assumptions": projection.__doc__.strip(),
               "gpu": env["gpu"], "h100_hours": gpu_proj["hours"] if not cuda or "H100" in (env["gpu"] or "") else
               "not yet measured (not an H100)", "gpu_projection": gpu_proj,
               "measured_on": args.device, "from_precision": best["precision"] if best else None,
               "this_device_projection": cpu_proj if cpu_proj else gpu_proj}
        records.append(rec)
        print(f"ImageNet-1k projection {method}: H100 hours = {rec['h100_hours']}; on this {args.device}: "
              f"{rec['this_device_projection'].get('hours', 'n/a')} h")
    save()
    if not args.skip_efficacy:
        records += efficacy(args.quick)
    save(final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
