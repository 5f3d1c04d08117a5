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


def _progress(command: str, quiet: bool):
    """The progress display of a command: stage, step k/N and ETA on stderr (see
    :mod:`ueguard.engine.progress`), unless ``--quiet``."""
    from ueguard.engine.progress import Progress

    return Progress(not quiet, name=command)


class SdkCommand(click.Command):
    """A command whose options are the SDK's, built from their one declaration (:mod:`ueguard.sdk.params`):
    every keyword of ``ueguard.sdk.protect`` / ``verify`` is a long option with the same name, type,
    default and help. They are built when first needed, so ``ueguard --help`` does not import torch."""

    def __init__(self, *args, declared: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.declared = declared
        self._built = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._built:
            quiet = self.params.pop()  # the command's own options first, then the SDK's, --quiet and --help last
            self.params += [_click_option(option) for option in _declared_options(self.declared)] + [quiet]
            self._built = True
        return super().get_params(ctx)


def _declared_options(command: str) -> list:
    from ueguard.sdk.params import options_of

    if command == "protect":
        from ueguard.sdk.options import ProtectOptions as declared
    else:
        from ueguard.sdk.verify import VerifyOptions as declared
    return options_of(declared)


def _click_option(option) -> click.Option:
    """One SDK option as a click option: choices as a choice, a bool as a flag, a mapping as a repeatable
    ``KEY=VALUE`` (parsed by the command), a path as a path; ranges are checked by the SDK."""
    from ueguard.sdk.params import bounds_text

    spec, default = option.spec, option.signature_default
    limits = None if spec.low is None and spec.high is None else bounds_text(spec.low, spec.high, spec.open_range)
    settings = dict(help=spec.help + (f" ({limits})" if limits else ""), metavar=spec.metavar)
    kinds = [kind for kind in option.kinds() if kind is not type(None)]
    if spec.pairs:
        return click.Option([*option.flags, option.keyword], multiple=True, **settings)
    if kinds == [bool]:
        return click.Option([*option.flags, option.keyword], is_flag=True, default=default, **settings)
    if spec.choices:
        kind = click.Choice(spec.choices)
    elif spec.path:
        kind = click.Path(exists=spec.path == "file", dir_okay=spec.path == "dir", file_okay=spec.path == "file")
    else:
        kind = str if spec.parse else kinds[0]
    return click.Option([*option.flags, option.keyword], type=kind, default=default,
                        show_default=default is not None, **settings)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ueguard", prog_name="ueguard")
def main() -> None:
    """ueguard: make image data unlearnable, and verify whether the protection holds."""


@main.command(cls=SdkCommand, declared="protect")
@click.argument("src", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", "out", type=click.Path(path_type=str), help="Output folder (default: SRC_protected beside SRC).")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@_handle_errors
def protect(src, out, quiet, **options) -> None:
    """Protect every image under SRC (class subfolders = labels, or --labels auto) into a mirrored folder."""
    from ueguard.data.images import LOSSY_FORMATS, lossy_suffix
    from ueguard.engine.distributed import environment
    from ueguard.sdk import protect as sdk_protect
    from ueguard.sdk.options import parse_method_options

    main_rank = environment().is_main  # under torchrun only rank 0 speaks; the others take part quietly
    quiet = quiet or not main_rank
    format_ = options["format"]
    if main_rank and format_ in LOSSY_FORMATS:
        click.echo(f"ueguard: warning: --format {format_} re-encodes lossily, which removes part of the "
                   "perturbation; the manifest's linf/psnr show what survived.", err=True)
    options["method_options"] = parse_method_options(options["method_options"])
    result = sdk_protect(src, out, **options, progress=_progress("protect", quiet))
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
        more = " (first 10 shown; all in the manifest)" if failures > 10 else ""
        click.echo(f"ueguard: {failures} file(s) failed{more}; {_protected_rest(len(linfs))}.", err=True)
        sys.exit(EXIT_SOME_FAILED)


def _protected_rest(protected: int) -> str:
    """The end of the failure line: how many images were protected beside the failed ones."""
    return "no image was protected" if protected == 0 else f"{protected} other image(s) were protected"


@main.command(cls=SdkCommand, declared="verify")
@click.argument("protected", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--test", "test", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Clean test images, same class folders (default: a share of --clean held out, see --holdout).")
@click.option("--clean", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="The original (unprotected) training images, for the baseline and the verdict.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write the report as JSON (per-run checkpoints go to FILE.state/).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write summary.md and PNG plots into this folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@_handle_errors
def verify(protected, test, clean, json_path, report_dir, quiet, **options) -> None:
    """Train on PROTECTED (and CLEAN) under each defense and paradigm, test on TEST (or on originals held out
    of CLEAN), and say whether the protection held in the worst case."""
    from ueguard.sdk import verify as sdk_verify
    from ueguard.sdk.options import parse_method_options

    options["defense_options"] = parse_method_options(options["defense_options"])
    report = sdk_verify(protected, test, clean, json_path=json_path, report_dir=report_dir,
                        progress=_progress("verify", quiet), **options)
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

    run_demo(workdir, seed=seed, progress=_progress("demo", quiet), echo=click.echo)


if __name__ == "__main__":
    main()
