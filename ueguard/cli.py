"""The ``ueguard`` command line: a thin click layer over :mod:`ueguard.sdk`.

Exit status: 0 success; 1 fatal error (e.g. the output disk is full: finished files are kept, fix it and
``--resume``); 2 usage error (bad option, refused destination); 3 some files failed (each recorded in the
manifest with its reason, the others protected); 130 interrupted (Ctrl-C; ``--resume`` continues).
Set ``UEGUARD_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
from array import array

import click

from ueguard.budgets import BUDGETS
from ueguard.display import format_report
from ueguard.errors import EXIT_FATAL, EXIT_SOME_FAILED, EXIT_USAGE, FatalError, PeerStopped, UsageError

EXIT_INTERRUPTED = 130


def _handle_errors(func):
    """Map SDK exceptions to exit codes with one-line messages (tracebacks only with UEGUARD_DEBUG=1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageError as error:
            click.echo(f"ueguard: error: {error}", err=True)
            sys.exit(EXIT_USAGE)
        except FatalError as error:
            click.echo(f"ueguard: fatal: {error}", err=True)
            sys.exit(EXIT_FATAL)
        except PeerStopped as error:  # torchrun: rank 0 has said why; the other ranks exit alike, quietly
            sys.exit({"usage": EXIT_USAGE, "interrupted": EXIT_INTERRUPTED}.get(error.kind, EXIT_FATAL))
        except KeyboardInterrupt:
            click.echo("\nueguard: interrupted. Finished files are kept; run the same command again with "
                       "--resume to continue where it stopped.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit:
            raise
        except Exception as error:  # fatal: say what, not a traceback
            if os.environ.get("UEGUARD_DEBUG"):
                raise
            click.echo(f"ueguard: fatal: {type(error).__name__}: {error}  (UEGUARD_DEBUG=1 shows the traceback)",
                       err=True)
            sys.exit(EXIT_FATAL)

    return wrapper


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ueguard", prog_name="ueguard")
def main() -> None:
    """ueguard: make image data unlearnable, and verify whether the protection holds."""


@main.command()
@click.argument("src", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", "out", type=click.Path(path_type=str), help="Output folder (default: SRC_protected beside SRC).")
@click.option("--method", default="emn", show_default=True, help="Protection method (see `ueguard methods`).")
@click.option("--eps", default="8/255", show_default=True,
              help="L∞ budget of L∞ methods: 8/255, 0.031, or 8 (meaning 8/255). L2 methods (lsp, ar) take "
                   "-o l2_eps=VALUE instead; ops changes one pixel (see `ueguard methods`).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Autocast precision for the surrogate (auto: bf16 on GPUs, fp32 on CPU).")
@click.option("--compile", "compile_", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="torch.compile the surrogate's steps (auto: on for CUDA, off on CPU, where it measured no faster).")
@click.option("--budget", default="standard", show_default=True, type=click.Choice(BUDGETS),
              help="Steps/rounds preset (and working-size cap: 64 / 128 / 224 px).")
@click.option("--size", type=click.IntRange(8, 1024), help="Working resolution in px (default: suited to the data).")
@click.option("--surrogate", help="Surrogate model: a timm name or one of ueguard's (resnet18_cifar, ...).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Local surrogate checkpoint.")
@click.option("--pretrained", is_flag=True, help="Surrogate weights from the timm hub (needs network).")
@click.option("--format", "format_", default="png", show_default=True,
              type=click.Choice(["png", "keep", "jpeg", "webp"]), help="Output format (lossy ones weaken protection).")
@click.option("--quality", default=95, show_default=True, type=click.IntRange(1, 100), help="JPEG/WebP quality.")
@click.option("--perturbation", type=click.Choice(["samplewise", "classwise"]), help="Sample- or class-wise δ.")
@click.option("-o", "--option", "method_options", multiple=True, metavar="KEY=VALUE",
              help="A method constant, e.g. -o pgd_steps=10 (repeatable).")
@click.option("--max-pixels", default=None, type=click.IntRange(1),
              help="Refuse images above this many pixels (decompression bombs; default 178956970).")
@click.option("--keep-metadata", is_flag=True,
              help="Keep camera/date/GPS EXIF in JPEG/PNG/WebP outputs. Never kept: the EXIF thumbnail "
                   "(a copy of the unprotected image), maker notes, XMP/IPTC, orientation (applied).")
@click.option("--follow-symlinks", is_flag=True,
              help="Follow links to folders and links that lead outside SRC (default: skipped, and listed).")
@click.option("--labels", "label_source", default="folders", show_default=True, type=click.Choice(["folders", "auto"]),
              help="Where labels come from: class subfolders, or (auto, for a flat folder) k-means pseudo-labels "
                   "of a pretrained surrogate's features (needs --weights or --pretrained).")
@click.option("--clusters", type=click.IntRange(1), help="Number of pseudo-classes for --labels auto "
              "(default: the best silhouette score over 2-10).")
@click.option("--loader", default="auto", show_default=True, type=click.Choice(["auto", "memory", "ffcv", "torch"]),
              help="How SRC is decoded into the working set: a thread pool (memory), DataLoader workers (torch), "
                   "or a cached FFCV file reused by later runs (ffcv, optional extra).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where the FFCV cache and the private "
              "resume state (the perturbation, until the run finishes) live (default: $UEGUARD_CACHE or "
              "~/.cache/ueguard); never inside --out or SRC.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in a non-empty --out.")
@click.option("--store", default="auto", show_default=True, type=click.Choice(["auto", "memory", "disk"]),
              help="Where sample-wise perturbations live: in memory, or memory-mapped in the private resume state "
                   "under --cache-dir (resumable row by row; auto: disk when they would take over 1/8 of the "
                   "machine's memory). Either gives the same bytes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def protect(src, out, method, eps, seed, device, precision, compile_, budget, size, surrogate, weights, pretrained, format_,
            quality, perturbation, method_options, max_pixels, keep_metadata, follow_symlinks, label_source, clusters,
            loader, cache_dir, resume, store, quiet) -> None:
    """Protect every image under SRC (class subfolders = labels, or --labels auto) into a mirrored folder."""
    from ueguard.data.images import LOSSY_FORMATS, lossy_suffix
    from ueguard.engine.distributed import environment
    from ueguard.sdk import protect as sdk_protect
    from ueguard.sdk.options import parse_method_options

    main_rank = environment().is_main  # under torchrun only rank 0 speaks; the others take part quietly
    quiet = quiet or not main_rank
    if main_rank and format_ in LOSSY_FORMATS:
        click.echo(f"ueguard: warning: --format {format_} re-encodes lossily, which removes part of the "
                   "perturbation; the manifest's linf/psnr show what survived.", err=True)
    result = sdk_protect(src, out, method, eps=eps, seed=seed, device=device, precision=precision, compile=compile_, budget=budget,
                         size=size, surrogate=surrogate, weights=weights, pretrained=pretrained, format=format_,
                         quality=quality, perturbation=perturbation,
                         method_options=parse_method_options(method_options), max_pixels=max_pixels,
                         keep_metadata=keep_metadata, follow_symlinks=follow_symlinks, label_source=label_source,
                         clusters=clusters, loader=loader, cache_dir=cache_dir, resume=resume, store=store,
                         progress=_show_progress(quiet))
    if not main_rank:
        return
    # One streaming pass over the records (a folder's come from the manifest): a few numbers per file.
    linfs, psnrs, rms, l0 = array("d"), array("d"), array("d"), array("d")
    over, norm, failed, failures, lossy_kept, noted, notes = 0, None, [], 0, 0, [], 0
    for item in result.items:
        if item["status"] == "ok":
            notes += bool(item.get("notes"))
            if item.get("notes") and len(noted) < 10:
                noted.append(f"{item['source']}: {'; '.join(item['notes'])}")
            lossy_kept += format_ == "keep" and lossy_suffix(item["output"])
            linfs.append(item["linf"])
            if item["psnr"] is not None:
                psnrs.append(item["psnr"])
            rms.append(item["rms"])
            l0.append(item["l0"])
            norm = norm or item.get("norm")
            over += item.get("within_budget") is False
        elif item["status"] == "failed":
            failures += 1
            if len(failed) < 10:
                failed.append(item)
    line = f"protected {len(linfs)} image(s) into {result.out}" if linfs else f"protected no image into {result.out}"
    if linfs:
        linf = statistics.median(linfs)
        line += f"; median L∞ {linf:.2f}/255" + (f", mean PSNR {statistics.fmean(psnrs):.1f} dB" if psnrs else "")
        if norm == "l2":
            line += f", median RMS {statistics.median(rms):.2f}/255 (L2 budget)"
        elif norm == "l0":
            line += f", median {statistics.median(l0):g} pixel(s) changed (L0 budget)"
        if over:
            line += f"; {over} file(s) exceed the method's budget (lossy format?) — see within_budget in the manifest"
    click.echo(line)
    if lossy_kept:
        click.echo(f"ueguard: warning: --format keep wrote {lossy_kept} file(s) in their lossy source format "
                   "(JPEG/WebP/GIF), which removes part of the perturbation; the manifest's linf/psnr show what "
                   "survived (--format png keeps all of it).", err=True)
    if result.skipped:
        click.echo(f"skipped {result.skipped} file(s): not images in class folders, or links not followed "
                   "(each listed in the manifest with the reason)")
    click.echo(f"manifest: {result.manifest_path}")
    for note in noted:
        click.echo(f"  note: {note}", err=True)
    if notes:
        click.echo(f"ueguard: note: {notes} file(s) lost metadata ueguard does not carry over (see 'notes' in "
                   "the manifest).", err=True)
    if failures:
        for item in failed:
            click.echo(f"  failed: {item['source']}: {item['error']}", err=True)
        more = f" (first 10 shown; all in the manifest)" if failures > 10 else ""
        click.echo(f"ueguard: {failures} file(s) failed{more}; {_protected_rest(len(linfs))}.", err=True)
        sys.exit(EXIT_SOME_FAILED)


def _protected_rest(protected: int) -> str:
    """The end of the failure line: how many images were protected beside the failed ones."""
    return "no image was protected" if protected == 0 else f"{protected} other image(s) were protected"


@main.command()
@click.argument("protected", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--test", "test", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Clean test images, same class folders (default: a share of --clean held out, see --holdout).")
@click.option("--clean", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="The original (unprotected) training images, for the baseline and the verdict.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), metavar="FRACTION",
              help="Without --test: hold out this stratified share of --clean (default 0.2, at least one per class, "
                   "seeded by --seed) as the test set, left out of both training sets.")
@click.option("--paradigm", default="scratch", show_default=True,
              help="scratch | finetune | frozen | linear, a comma list, or all (see `ueguard defenses`).")
@click.option("--defense", default="none", show_default=True,
              help="Training-time defense, a comma list, or all: the battery (see `ueguard defenses`).")
@click.option("-d", "--defense-option", "defense_options", multiple=True, metavar="[DEFENSE.]KEY=VALUE",
              help="A defense constant, e.g. -d staged.tau=0.5 or -d quality=20 (repeatable).")
@click.option("--arch", help="Victim architecture (default: CIFAR ResNet-18 up to 64 px, timm resnet18 above).")
@click.option("--epochs", type=click.IntRange(1), help="Training epochs (default per budget: 10 / 30 / 60).")
@click.option("--budget", default="standard", show_default=True, type=click.Choice(BUDGETS))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Pretrained checkpoint for finetune/frozen/linear.")
@click.option("--pretrained", is_flag=True, help="Pretrained weights from the timm hub for finetune/frozen/linear.")
@click.option("--size", type=click.IntRange(8, 1024), help="Training resolution in px.")
@click.option("--batch-size", type=click.IntRange(1), help="Training batch size (default: the recipe's; 128 standard, "
              "1024 fast).")
@click.option("--lr", type=float, help="Peak learning rate (default: the recipe's; standard: 0.1 scratch, 1e-3 "
              "finetune).")
@click.option("--recipe", help="Training recipe: standard | fast (default: the architecture's; fast for "
              "fastvgg_cifar). See docs/victim.md.")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Verdict: protected iff acc - chance <= threshold * (clean acc - chance).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]))
@click.option("--compile", "compile", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="torch.compile the surrogate's steps (auto: on for CUDA, off on CPU, where it measured no faster).")
@click.option("--loader", default="auto", show_default=True, type=click.Choice(["auto", "memory", "ffcv", "torch"]),
              help="How training images are read: memory (one tensor on the device), ffcv (streamed from a "
                   "cached FFCV file; optional extra), torch (streamed by a DataLoader); auto: memory when it fits.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where the FFCV cache lives "
              "(default: $UEGUARD_CACHE or ~/.cache/ueguard).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write the report as JSON (per-run checkpoints go to FILE.state/).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write summary.md and PNG plots into this folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted battery at the run it stopped in.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def verify(protected, test, clean, json_path, report_dir, quiet, defense_options, **options) -> None:
    """Train on PROTECTED (and CLEAN) under each defense and paradigm, test on TEST (or on originals held out
    of CLEAN), and say whether the protection held in the worst case."""
    from ueguard.sdk import verify as sdk_verify
    from ueguard.sdk.options import parse_method_options

    report = sdk_verify(protected, test, clean, json_path=json_path, report_dir=report_dir,
                        progress=_show_progress(quiet), defense_options=parse_method_options(defense_options),
                        **options)
    click.echo(format_report(report))
    if json_path:
        click.echo(f"report: {json_path}")
    if report_dir:
        click.echo(f"summary and plots: {report_dir}/summary.md")


@main.command()
def methods() -> None:
    """List the protection methods."""
    from ueguard.methods import METHODS, list_methods

    budgets = {"linf": "L∞ --eps", "l2": "L2 -o l2_eps", "l0": "L0 one pixel"}
    for name, description in list_methods():
        cls = METHODS.get(name)
        if cls.name != name:
            click.echo(f"{name:<10} {description}")
            continue
        tags = [cls.budget_text or budgets[cls.norm]] + [tag for tag, on in (
            ("needs pretrained surrogate: --weights/--pretrained", cls.needs_pretrained),
            ("model-free", not cls.needs_surrogate),
            ("label-free", not cls.needs_labels)) if on]
        click.echo(f"{name:<10} {description} [{', '.join(tags)}]")


@main.command()
def defenses() -> None:
    """List the defenses and training paradigms that verify runs."""
    import dataclasses

    from ueguard.defenses import DEFENSES, PARADIGMS, list_defenses, paradigm_names

    click.echo("defenses (--defense NAME, a comma list, or all; constants with -d NAME.KEY=VALUE):")
    for name, description in list_defenses():
        click.echo(f"  {name:<10} {description}")
        fields = dataclasses.fields(DEFENSES.get(name).config_class)
        if fields:
            click.echo(f"  {'':<10} options: " + ", ".join(f"{f.name}={f.default:.4g}" if isinstance(f.default, float)
                                                        else f"{f.name}={f.default}" for f in fields))
    click.echo("paradigms (--paradigm NAME, a comma list, or all):")
    for name in paradigm_names():
        click.echo(f"  {name:<10} {PARADIGMS.get(name).description}")


@main.command()
@click.option("--workdir", default="ueguard-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo writes its folders (rebuilt on each run).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def demo(workdir, seed, quiet) -> None:
    """Protect scikit-learn's handwritten digits with EMN and verify against the clean baseline."""
    from ueguard.demo import run_demo

    run_demo(workdir, seed=seed, progress=_show_progress(quiet), echo=click.echo)


if __name__ == "__main__":
    main()
