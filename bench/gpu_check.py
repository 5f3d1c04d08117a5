"""The GPU half of ueguard's benchmarks in one command: every GPU cell of bench/README.md, the first time a
GPU is available, within a fixed time budget (default 8 minutes on one H100/H200).

    python3 bench/gpu_check.py [--json-dir DIR] [--budget-s 480]      # on a CUDA machine
    python3 bench/gpu_check.py --dry-run [--json-dir DIR]             # anywhere: every step at toy size on CPU

``--quick`` passes the bench scripts' ``--quick`` on the GPU too (a shorter window); ``--steps a,b`` runs a subset.

Results land in ``--json-dir`` (default ``$OUT``, else ``./gpu-results``): one JSON per step in the record
format of the bench script it ran (``{"command", "environment", "records"}``, bench/_timing.py), and
``gpu-check-summary.json`` with each step's status, wall time, time limit, command and output tail, the device,
torch/triton versions and the whole run's wall time. Eight files at most. The machine needs only the checkout:
real images come from ``bench/data/cifar10-slice.npz`` (bench/cifar10_slice.py), everything else is synthetic.

Steps, in order (each in its own process with its own time limit, so one failure or hang costs only itself;
a step's limit is cut so that the later steps keep their minimum share of ``--budget-s``):

1. ``install`` — ueguard importable from this checkout with its C++ extension; if not, ``pip install
   --no-build-isolation --no-deps -e .`` (then ``setup.py build_ext --inplace`` if pip fails). The machine's
   own torch is kept (``--no-deps``; the torch version is checked before and after). Dry run: checks only.
2. ``data`` — the CIFAR-10 slice is there and well-formed (dry run: a few dozen of its images, in a temp file).
3. ``kernel_tests`` — tests/test_kernels.py and tests/test_bench_kernels.py with ``TRITON_INTERPRET=0``: the
   Triton backend on CUDA tensors against the PyTorch reference. A probe first checks that Triton is compiled,
   not interpreted, and that a CUDA tensor dispatches to it; the step fails if no Triton test passed.
4. ``kernels`` — bench/kernels.py ``--devices cuda``: Triton vs eager, GB/s and the fraction of the measured
   device-to-device copy bandwidth.
5. ``engine`` — bench/engine.py ``--device cuda --compile off`` (full preset: batches 512 / 128, fp32 and
   bf16, EMN and SSC at 32 and 224 px, the whole-run slice).
6. ``victim`` — bench/victim.py (when present) trains the fast victim on the slice on the GPU and times it;
   ``skipped`` with the reason while that script is not in the checkout.
7. ``engine_compile_emn``, 8. ``engine_compile_ssc`` — bench/engine.py ``--compile both --precisions bf16``
   (CUDA's default precision): torch.compile on vs off side by side (``compile_speedup``), last because
   compilation time is the least predictable; each keeps the cases it finished if stopped at its limit.
9. ``imagenet_projection`` — the ImageNet-1k hours from the best measured 224-px engine throughput
   (bench/engine.py's ``projection``), per method.

The dry run (``tests/test_gpu_check.py``) runs the same steps on a CPU: interpreted Triton, tiny shapes,
``--quick`` variants, a smaller 32-px surrogate, torch.compile disabled (``TORCHDYNAMO_DISABLE=1``: the
compile-both bookkeeping without minutes of inductor), no pip install.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SLICE = HERE / "data" / "cifar10-slice.npz"
SUMMARY = "gpu-check-summary.json"
TAIL_CHARS = 4000
VICTIM_ARCHS = "fastvgg_cifar,resnet18_cifar"


@dataclass
class Step:
    name: str
    run: object  # callable(ctx, step, timeout_s) -> dict
    cap_s: float  # the step's own limit
    reserve_s: float  # the least time worth starting it with (kept free for it by the steps before)
    expected_s: float  # what it should take on one H100/H200 (documentation; the summary records it)
    gpu_only: bool = True  # skipped when no CUDA device is found outside a dry run


@dataclass
class Context:
    out: Path
    dry: bool
    budget_s: float
    started: float
    tmp: Path
    args: argparse.Namespace
    probe: dict = field(default_factory=dict)
    results: list = field(default_factory=list)

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def tag(self) -> str:
        return "dry" if self.dry else "cuda"

    def quick(self) -> list[str]:
        """``--quick`` for the bench scripts of a GPU run when asked for (a dry run passes its own)."""
        return ["--quick"] if self.args.quick else []

    def env(self, **extra: str) -> dict:
        """A step's environment: compiled Triton on a GPU; in a dry run interpreted Triton and one CPU thread
        (two threads on a loaded machine stall in OpenMP barriers and make a toy run take minutes)."""
        mode = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"} if self.dry else {"TRITON_INTERPRET": "0"}
        return child_env(**mode, **extra)


# ------------------------------------------------------------------------------------------- processes

def child_env(**extra: str) -> dict:
    """The environment of every step: this checkout first on the import path, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_process(argv: list[str], timeout_s: float, env: dict | None = None, label: str = "") -> dict:
    """Run ``argv`` in the checkout, echo its output with ``[label]`` and keep the tail; on timeout end its
    whole process group (it was started in a session of its own). Returns rc, timed_out, wall_s, tail."""
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=400)

    def pump():
        for line in proc.stdout:
            tail.append(line)
            print(f"[{label}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    text = "".join(tail)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"command": shlex.join(argv), "rc": proc.returncode, "timed_out": timed_out,
            "wall_s": round(time.monotonic() - started, 1), "cpu_s": round(cpu_s, 1), "output_tail": text[-TAIL_CHARS:]}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def read_records(path: Path) -> list[dict] | None:
    """The records of a bench JSON (``None`` when absent or not valid JSON of that format)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    records = data.get("records") if isinstance(data, dict) else None
    return records if isinstance(records, list) else None


def bench_step(ctx: Context, script: str, args: list[str], json_name: str, timeout_s: float, env=None,
               check=None) -> dict:
    """Run ``bench/<script>`` with ``--json`` into the results folder; ok when it exits 0 and wrote records
    (a timed-out run that had written some keeps them: status ``timeout``, ``partial`` true)."""
    path = ctx.out / json_name
    path.unlink(missing_ok=True)
    result = run_process(python(f"bench/{script}", *args, "--json", str(path)), timeout_s, env or ctx.env(),
                         label=script)
    records = read_records(path)
    result["json"] = json_name if records is not None else None
    result["records"] = len(records) if records is not None else 0
    problem = None
    if result["timed_out"]:
        result["status"] = "timeout"
        result["partial"] = bool(records)
        return result
    if result["rc"] != 0:
        problem = f"exit status {result['rc']}"
    elif not records:
        problem = f"{json_name} missing or without records"
    elif check is not None:
        problem = check(records)
    result["status"] = "failed" if problem else "ok"
    if problem:
        result["reason"] = problem
    return result


# ------------------------------------------------------------------------------------------- the steps

PROBE = r"""
import importlib.metadata, json, os, platform, sys
from pathlib import Path
out = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   gpu_count=torch.cuda.device_count())
except Exception as e:
    out["torch_error"] = repr(e)
try:
    import triton
    out["triton"] = triton.__version__
except Exception as e:
    out["triton"] = None
try:
    import ueguard
    from ueguard.kernels import _ext
    out["ueguard"] = ueguard.__version__
    out["ueguard_path"] = str(Path(ueguard.__file__).resolve().parents[1])
    out["from_this_checkout"] = out["ueguard_path"] == sys.argv[1]
    out["cpp"] = _ext.cpp_available()
    out["cpp_reason"] = _ext.cpp_unavailable_reason()
    out["cpu_isa"] = _ext.cpu_isa() if _ext.cpp_available() else None
    from ueguard.kernels import backend_for, project
    out["triton_interpreted"] = bool(getattr(project, "_TRITON_INTERPRETED", False))
    if project.triton is not None and out.get("cuda"):
        t = torch.zeros(1, device="cuda")
        out["cuda_backends"] = {op: backend_for(t, op) for op in ("project_step", "apply_quantize", "augment")}
except Exception as e:
    out["ueguard_error"] = repr(e)
try:
    importlib.metadata.distribution("ueguard")
    out["pip_installed"] = True
except importlib.metadata.PackageNotFoundError:
    out["pip_installed"] = False
sys.path.insert(0, sys.argv[1] + "/bench")
from _timing import cpu_model
out["cpu"] = cpu_model()
out["cpu_count"] = os.cpu_count()
print("PROBE " + json.dumps(out))
"""


def probe(ctx: Context, timeout_s: float = 120) -> dict:
    """Versions, the device, and whether ueguard, its C++ extension and Triton (compiled on a GPU, interpreted
    in a dry run: ``TRITON_INTERPRET`` as the kernel tests get it) load from this checkout."""
    result = run_process(python("-c", PROBE, str(ROOT)), timeout_s, ctx.env(), label="probe")
    for line in reversed(result["output_tail"].splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    return {"probe_error": result["output_tail"][-1000:] or f"exit status {result['rc']}"}


def importable(p: dict) -> bool:
    return bool(p.get("from_this_checkout")) and "ueguard_error" not in p and "probe_error" not in p


def ready(p: dict) -> bool:
    return importable(p) and bool(p.get("cpp"))


def step_install(ctx: Context, step: Step, timeout_s: float) -> dict:
    started = time.monotonic()
    before = after = probe(ctx)
    result = {"before": before}
    if ctx.dry:  # checks only: a dry run installs nothing, and runs on the references where the C++ build is missing
        ctx.probe = before
        ok = importable(before)
        result.update(status="ok" if ok else "failed", wall_s=round(time.monotonic() - started, 1))
        if not ok:
            result["reason"] = ("ueguard is not importable from this checkout: "
                                f"{before.get('ueguard_error') or before.get('probe_error')}")
        elif not before.get("cpp"):
            result["note"] = f"C++ extension not built ({before.get('cpp_reason')}): CPU ops run on the references"
        return result
    if not ready(before):
        jobs = str(os.cpu_count() or 4)
        attempts = [python("-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--no-input",
                           "-e", "."),
                    python("setup.py", "build_ext", "--inplace")]
        result["attempts"] = []
        for argv in attempts:
            left = timeout_s - (time.monotonic() - started)
            if left < 10:
                break
            attempt = run_process(argv, left, ctx.env(MAX_JOBS=jobs), label="install")
            result["attempts"].append({k: attempt[k] for k in ("command", "rc", "timed_out", "wall_s")})
            result["output_tail"] = attempt["output_tail"]
            after = probe(ctx)
            if attempt["rc"] == 0 and ready(after):
                break
    ctx.probe = after
    result["after"] = after
    result["wall_s"] = round(time.monotonic() - started, 1)
    if before.get("torch") and after.get("torch") != before.get("torch"):
        result.update(status="failed", reason=f"torch changed from {before.get('torch')} to {after.get('torch')}")
    elif not ready(after):
        result.update(status="failed", reason="ueguard or its C++ extension still not importable from this checkout: "
                      f"{after.get('ueguard_error') or after.get('cpp_reason') or after.get('ueguard_path')}")
    elif not after.get("cuda"):
        result.update(status="failed", reason="no CUDA device: run with --dry-run on a machine without one")
    else:
        result["status"] = "ok"
    return result


def step_data(ctx: Context, step: Step, timeout_s: float) -> dict:
    import numpy as np

    import cifar10_slice

    started = time.monotonic()
    if not SLICE.is_file():
        return {"status": "failed", "reason": f"{SLICE.relative_to(ROOT)} is missing (python bench/cifar10_slice.py "
                "makes it from the CIFAR-10 batches)", "wall_s": 0.0}
    arrays = cifar10_slice.load(SLICE)
    shapes = {k: list(v.shape) for k, v in arrays.items()}
    problems = [k for k in cifar10_slice.KEYS if k not in arrays]
    if not problems:
        problems += [f"{k} is {arrays[k].dtype}" for k, dt in (("train_x", np.uint8), ("test_x", np.uint8),
                                                               ("train_y", np.int64), ("test_y", np.int64))
                     if arrays[k].dtype != dt]
        problems += [f"{k} shape {shapes[k]}" for k in ("train_x", "test_x") if shapes[k][1:] != [32, 32, 3]]
    result = {"file": str(SLICE.relative_to(ROOT)), "bytes": SLICE.stat().st_size, "sha256": cifar10_slice.sha256(SLICE),
              "shapes": shapes, "train_per_class": np.bincount(arrays["train_y"]).tolist() if not problems else None}
    if problems:
        result.update(status="failed", reason="; ".join(map(str, problems)))
    else:
        ctx.args.npz = SLICE
        if ctx.dry:  # a few dozen images: 48 train, 20 test
            ctx.args.npz = ctx.tmp / "cifar10-tiny.npz"
            cifar10_slice.save(cifar10_slice.tiny(arrays, 48, 20), ctx.args.npz)
            result["dry_run_npz"] = "48 train + 20 test images of the slice (temporary file)"
        result["status"] = "ok"
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def junit_summary(path: Path) -> dict:
    """Counts of a pytest JUnit XML file, the Triton-backend tests separately, and the failures."""
    tree = ET.parse(path)
    counts = collections.Counter()
    triton = collections.Counter()
    failures, skips = [], collections.Counter()
    for case in tree.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                failures.append({"test": name, "message": (child.get("message") or child.text or "")[:400]})
            elif child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "")[:200]] += 1
        counts[outcome] += 1
        if "triton" in case.get("name", ""):
            triton[outcome] += 1
    return {"counts": dict(counts), "triton_backend": dict(triton), "failures": failures[:30],
            "skip_reasons": dict(skips.most_common(12))}


def step_kernel_tests(ctx: Context, step: Step, timeout_s: float) -> dict:
    started = time.monotonic()
    env = ctx.env()
    p = ctx.probe
    triton = {"triton": p.get("triton"), "interpreted": p.get("triton_interpreted"),
              "cuda_backends": p.get("cuda_backends")}
    result = {"triton_probe": triton}
    junit = ctx.tmp / "kernel-tests.xml"
    argv = python("-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
                  "tests/test_kernels.py", "tests/test_bench_kernels.py")
    if ctx.dry:
        argv += ["-k", "hand_computed or copy_bandwidth"]
    elif ctx.args.test_workers > 0 and importlib.util.find_spec("xdist") is not None:
        argv += ["-n", str(ctx.args.test_workers)]
    left = timeout_s - (time.monotonic() - started)
    run = run_process(argv, left, env, label="kernel-tests")
    result.update(run)
    summary = junit_summary(junit) if junit.is_file() else None
    result["tests"] = summary
    if summary is not None:
        records = [{"bench": "kernel_tests", "tests": "tests/test_kernels.py tests/test_bench_kernels.py",
                    "triton_interpret": env["TRITON_INTERPRET"], "triton_probe": triton, **summary}]
        from _timing import write_json

        name = f"kernel-tests-{ctx.tag()}.json"
        write_json(ctx.out / name, records, ("TRITON_INTERPRET=" + env["TRITON_INTERPRET"] + " " +
                                             shlex.join(["python", *argv[1:]]).replace(str(ctx.tmp), "TMP")))
        result["json"] = name
    want_interpreted = ctx.dry
    problem = None
    if ctx.dry and not triton.get("triton") and "ueguard_error" not in p:
        result["note"] = "triton is not installed: its tests skip, only the C++ and reference backends ran"
        if run["rc"] != 0 or summary is None:
            problem = f"pytest exit status {run['rc']}"
    elif not triton.get("triton") or triton["interpreted"] is None:
        problem = f"triton or ueguard.kernels did not load: {p.get('ueguard_error') or p.get('probe_error')}"
    elif triton["interpreted"] != want_interpreted:
        problem = f"Triton is {'interpreted' if triton['interpreted'] else 'compiled'}, expected the other"
    elif not ctx.dry and set((triton.get("cuda_backends") or {}).values()) != {"triton"}:
        problem = f"a CUDA tensor does not dispatch to Triton: {triton.get('cuda_backends')}"
    elif run["timed_out"]:
        result["status"] = "timeout"
        return result
    elif summary is None:
        problem = f"pytest wrote no JUnit report (exit status {run['rc']})"
    elif run["rc"] != 0:
        problem = f"pytest exit status {run['rc']}: {summary['counts']}"
    elif not summary["triton_backend"].get("passed"):
        problem = f"no Triton-backend test passed: {summary['triton_backend']} (skips: {summary['skip_reasons']})"
    result["status"] = "failed" if problem else "ok"
    if problem:
        result["reason"] = problem
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def step_kernels(ctx: Context, step: Step, timeout_s: float) -> dict:
    triton = bool(ctx.probe.get("triton"))
    if ctx.dry:
        args = ["--quick", "--devices", "cpu", "--shapes", "4x3x8x8", "--copy-mib", "8"]
        args += ["--interpreted-triton"] if triton else []
    else:
        args = ["--devices", "cuda", *ctx.quick()]
    env = ctx.env()
    want = "cpu" if ctx.dry else "cuda"

    def check(records):
        mine = [r for r in records if r.get("device") == want and (r.get("backend") == "triton" or not triton)]
        if not mine:
            return f"no Triton records on {want}"
        if not all(r.get("copy_gbps", 0) > 0 and r.get("gbps", 0) > 0 for r in mine):
            return "a record without GB/s or copy bandwidth"
        return None

    return bench_step(ctx, "kernels.py", args, f"kernels-{ctx.tag()}.json", timeout_s, env, check)


def engine_args(ctx: Context, compile_: str, methods: list[str]) -> tuple[list[str], dict]:
    args = ["--skip-efficacy", "--compile", compile_, "--methods", *methods]
    if compile_ == "both":  # CUDA's default precision (Runtime: auto = bf16 there): fewer graphs to compile
        args += ["--precisions", "bf16"]
    if ctx.dry:
        return (["--quick", "--device", "cpu", "--sizes", "32", "--batch", "2", "--steps", "1", "--repeat", "1",
                 "--arch32", "resnet20_cifar", "--threads", "1", *args], ctx.env(TORCHDYNAMO_DISABLE="1"))
    return ["--device", "cuda", "--sizes", "32", "224", *ctx.quick(), *args], ctx.env()


def check_engine(ctx: Context, methods, compile_: str):
    want = "cpu" if ctx.dry else "cuda"

    def check(records):
        pgd = [r for r in records if r.get("bench") == "pgd" and r.get("device") == want]
        missing = sorted(set(methods) - {r["method"] for r in pgd})
        if missing:
            return f"no PGD records for {', '.join(missing)}"
        if compile_ == "both" and not any("compile_speedup" in r for r in pgd):
            return "no compile_speedup in the records"
        return None

    return check


def step_engine(ctx: Context, step: Step, timeout_s: float) -> dict:
    args, env = engine_args(ctx, "off", ["emn", "ssc"])
    return bench_step(ctx, "engine.py", args, f"engine-{ctx.tag()}.json", timeout_s, env,
                      check_engine(ctx, ["emn", "ssc"], "off"))


def compile_step(method: str):
    def run(ctx: Context, step: Step, timeout_s: float) -> dict:
        args, env = engine_args(ctx, "both", [method])
        return bench_step(ctx, "engine.py", args, f"engine-{ctx.tag()}-compile-{method}.json", timeout_s, env,
                          check_engine(ctx, [method], "both"))

    return run


def step_victim(ctx: Context, step: Step, timeout_s: float) -> dict:
    script = HERE / "victim.py"
    if not script.is_file():
        return {"status": "skipped", "reason": "bench/victim.py is not in this checkout yet (the fast-victim work "
                "adds it: fastvgg_cifar, --device/--npz/--archs/--epochs)", "wall_s": 0.0}
    if getattr(ctx.args, "npz", None) is None:
        return {"status": "skipped", "reason": "no CIFAR-10 slice (the data step failed)", "wall_s": 0.0}
    if ctx.dry:
        args = ["--quick", "--device", "cpu", "--archs", "fastvgg_cifar", "--epochs", "1"]
    else:
        args = [*ctx.quick(), "--device", "cuda", "--archs", ctx.args.victim_archs,
                "--epochs", str(ctx.args.victim_epochs)]
    npz = str(ctx.args.npz.relative_to(ROOT)) if ctx.args.npz.is_relative_to(ROOT) else str(ctx.args.npz)
    return bench_step(ctx, "victim.py", [*args, "--npz", npz], f"victim-{ctx.tag()}.json", timeout_s, ctx.env())


def _load_engine():
    spec = importlib.util.spec_from_file_location("bench_engine", HERE / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    spec.loader.exec_module(module)
    return module


def step_projection(ctx: Context, step: Step, timeout_s: float) -> dict:
    """ImageNet-1k hours per method from the fastest 224-px engine record of this run (the dry run, which
    measures 32 px only, projects from that size and says so)."""
    started = time.monotonic()
    sources = sorted(ctx.out.glob(f"engine-{ctx.tag()}*.json"))
    pgd = []
    for path in sources:
        for r in read_records(path) or []:
            if r.get("bench") == "pgd":
                pgd.append({**r, "_file": path.name})
    if not pgd:
        return {"status": "skipped", "reason": "no engine records to project from", "wall_s": 0.0}
    engine = _load_engine()
    gpu = ctx.probe.get("gpu")
    records = []
    for method in sorted({r["method"] for r in pgd}):
        mine = [r for r in pgd if r["method"] == method]
        size = 224 if any(r["size"] == 224 for r in mine) else max(r["size"] for r in mine)
        best = max((r for r in mine if r["size"] == size), key=lambda r: r["engine_images_steps_per_s"])
        proj = engine.projection(best["engine_images_steps_per_s"])
        h100 = proj["hours"] if gpu and "H100" in gpu else f"not measured on an H100 (measured on {gpu or 'a CPU'})"
        records.append({"bench": "projection_imagenet1k", "method": method, "images": engine.IMAGENET_IMAGES,
                        "size": 224, "from_size": size, "device": best["device"], "gpu": gpu, "h100_hours": h100,
                        "this_device_hours": proj["hours"], "hours_per_round": proj["hours_per_round"],
                        "from": {"file": best["_file"], "precision": best["precision"], "compile": best["compile"],
                                 "batch": best["batch"], "engine_images_steps_per_s": best["engine_images_steps_per_s"]},
                        "assumptions": engine.projection.__doc__.strip(), "dry_run": ctx.dry})
        print(f"[projection] ImageNet-1k {method}: {proj['hours']:.1f} h on {gpu or 'this CPU'} "
              f"(from {size} px, {best['precision']}, compile {best['compile']}, {best['_file']})", flush=True)
    from _timing import write_json

    name = f"imagenet-projection-{ctx.tag()}.json"
    write_json(ctx.out / name, records, command_line_here(ctx))
    return {"status": "ok", "json": name, "records": len(records), "wall_s": round(time.monotonic() - started, 1)}


def command_line_here(ctx: Context) -> str:
    return shlex.join(["python3", "bench/gpu_check.py", *ctx.args.argv])


STEPS = [
    Step("install", step_install, cap_s=240, reserve_s=30, expected_s=75, gpu_only=False),
    Step("data", step_data, cap_s=30, reserve_s=2, expected_s=1, gpu_only=False),
    Step("kernel_tests", step_kernel_tests, cap_s=150, reserve_s=30, expected_s=75),
    Step("kernels", step_kernels, cap_s=90, reserve_s=20, expected_s=25),
    Step("engine", step_engine, cap_s=150, reserve_s=40, expected_s=60),
    Step("victim", step_victim, cap_s=120, reserve_s=30, expected_s=45),
    Step("engine_compile_emn", compile_step("emn"), cap_s=180, reserve_s=45, expected_s=100),
    Step("engine_compile_ssc", compile_step("ssc"), cap_s=180, reserve_s=45, expected_s=100),
    Step("imagenet_projection", step_projection, cap_s=30, reserve_s=3, expected_s=3, gpu_only=False),
]


#: Steps that run whatever ``--steps`` says: the others need the probe and the slice they leave behind.
ALWAYS = ("install", "data")


# ----------------------------------------------------------------------------------------------- main

def write_summary(ctx: Context, final: bool = False) -> None:
    p = ctx.probe
    summary = {
        "command": command_line_here(ctx), "dry_run": ctx.dry, "budget_s": ctx.budget_s,
        "wall_seconds": round(time.monotonic() - ctx.started, 1), "finished": final,
        "environment": {"gpu": p.get("gpu"), "gpu_memory_gib": p.get("gpu_memory_gib"), "capability": p.get("capability"),
                        "torch": p.get("torch"), "torch_cuda": p.get("torch_cuda"), "triton": p.get("triton"),
                        "python": p.get("python"), "cpu": p.get("cpu"), "cpu_count": p.get("cpu_count"),
                        "ueguard": p.get("ueguard"), "cpu_isa": p.get("cpu_isa"),
                        "multiprocessors": p.get("multiprocessors"), "gpu_count": p.get("gpu_count")},
        "expected_s": sum(e["expected_s"] for e in ctx.results),
        "probe": p,
        "steps": ctx.results,
        "files": sorted(f.name for f in ctx.out.glob("*.json")),
        "next": "commit these files to bench/results/ and fill the GPU cells of bench/README.md "
                "(its 'GPU check' section lists them)",
    }
    tmp = ctx.out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, ctx.out / SUMMARY)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-dir", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"),
                        help="folder for the results (default: $OUT, else ./gpu-results)")
    parser.add_argument("--budget-s", type=float, default=480, help="total time budget in seconds (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="every step at toy size on the CPU; installs nothing")
    parser.add_argument("--quick", action="store_true",
                        help="the bench scripts' --quick presets on the GPU too (fewer repeats, smaller batches)")
    parser.add_argument("--steps", help="comma list of steps to run (default: all; install and data always run): "
                        + ", ".join(s.name for s in STEPS))
    parser.add_argument("--victim-archs", default=VICTIM_ARCHS, help="bench/victim.py --archs (default %(default)s)")
    parser.add_argument("--victim-epochs", type=int, default=10, help="bench/victim.py --epochs (default %(default)s)")
    parser.add_argument("--test-workers", type=int, default=8,
                        help="pytest-xdist workers for the kernel tests when xdist is installed (0: serial)")
    args = parser.parse_args(argv)
    args.argv, args.npz = argv, None
    chosen = [s.strip() for s in args.steps.split(",")] if args.steps else [s.name for s in STEPS]
    chosen += [s.name for s in STEPS if s.name in ALWAYS]
    unknown = set(chosen) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown step(s) {', '.join(sorted(unknown))}")
    out = args.json_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(out=out, dry=args.dry_run, budget_s=args.budget_s, started=time.monotonic(), tmp=Path(tmp),
                      args=args)
        steps = [s for s in STEPS if s.name in chosen]
        for i, step in enumerate(steps):
            later = sum(s.reserve_s for s in steps[i + 1:])
            remaining = ctx.remaining()
            timeout_s = min(step.cap_s, max(remaining - later, step.reserve_s))
            print(f"=== {step.name} (limit {timeout_s:.0f} s, {remaining:.0f} s of the budget left)", flush=True)
            entry = {"step": step.name, "expected_s": step.expected_s, "timeout_s": round(timeout_s)}
            if remaining < step.reserve_s:
                entry.update(status="skipped", reason=f"budget spent: {remaining:.0f} s left, the step needs "
                             f"{step.reserve_s:.0f} s")
            elif step.gpu_only and not ctx.dry and not ctx.probe.get("cuda"):
                entry.update(status="skipped", reason="no CUDA device (see the install step)")
            else:
                try:
                    entry.update(step.run(ctx, step, timeout_s))
                except Exception as error:  # a bug in one step must not cost the others
                    import traceback

                    entry.update(status="failed", reason=f"{type(error).__name__}: {error}",
                                 output_tail=traceback.format_exc()[-TAIL_CHARS:])
            ctx.results.append(entry)
            print(f"=== {step.name}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else "")
                  + f", {entry.get('wall_s', 0)} s", flush=True)
            write_summary(ctx)
        write_summary(ctx, final=True)
    print(f"\n{'step':22} {'status':8} {'wall s':>7} {'cpu s':>7}  reason")
    for e in ctx.results:
        print(f"{e['step']:22} {e['status']:8} {e.get('wall_s', 0):7} {e.get('cpu_s', ''):>7}  {e.get('reason', '')[:100]}")
    print(f"results in {out} ({SUMMARY} + {len(ctx.results)} steps), {time.monotonic() - ctx.started:.0f} s")
    return 0 if all(e["status"] in ("ok", "skipped") for e in ctx.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
