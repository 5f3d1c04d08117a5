"""The SDK's keywords are declared once (ueguard.sdk.params): real signatures, help text, type checks naming
the keyword, and a command line whose long options are exactly the SDK's keywords."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc

import click
import numpy as np
import pytest
from click.testing import CliRunner

from ueguard import cli
from ueguard.errors import OptionTypeError, UsageError
from ueguard.sdk import ProtectOptions, VerifyOptions, protect, verify
from ueguard.sdk.params import CLI_ONLY, SDK_ONLY, options_of, param, takes_options

COMMANDS = [(protect, ProtectOptions, cli.protect), (verify, VerifyOptions, cli.verify)]
IMAGES = np.zeros((4, 8, 8, 3), np.uint8)


def test_protect_signature_shows_the_real_parameters_with_their_defaults():
    params = inspect.signature(protect).parameters
    assert list(params)[:3] == ["src", "out", "method"]
    assert params["eps"].default == "8/255" and params["seed"].default == 0
    assert params["budget"].default == "standard" and params["max_pixels"].default == 178956970
    assert params["seed"].kind is inspect.Parameter.KEYWORD_ONLY and params["seed"].annotation == "int"
    assert params["labels"].default == "folders" and "method_options" in params
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("function, declared, _", COMMANDS)
def test_every_declared_option_is_a_parameter_with_its_default_and_its_help(function, declared, _):
    params = inspect.signature(function).parameters
    text = pydoc.render_doc(function, renderer=pydoc.plaintext)
    for option in options_of(declared):
        assert params[option.keyword].default == option.signature_default, option.keyword
        assert f"{option.keyword} (" in text and option.spec.help[:40] in " ".join(text.split()), option.keyword
    assert len(options_of(declared)) == len(dataclasses.fields(declared))  # every field is declared


@pytest.mark.parametrize("call, name", [
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], seed="7"), "seed"),
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], budget=3), "budget"),
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], pretrained="yes"), "pretrained"),
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], eps=[8]), "eps"),
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], method_options=5), "method_options"),
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], max_pixels=None), "max_pixels"),
    (lambda: verify("nowhere", epochs="3"), "epochs"),
    (lambda: verify("nowhere", threshold="half"), "threshold"),
])
def test_a_wrong_type_is_a_type_error_naming_the_keyword(call, name):
    with pytest.raises(TypeError, match=f"^{name} must be") as error:
        call()
    assert isinstance(error.value, OptionTypeError) and isinstance(error.value, UsageError)  # the CLI's exit 2


@pytest.mark.parametrize("call, message", [
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], size=7), "invalid size 7: must be from 8 to 1024"),
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], device="tpu"), "invalid device 'tpu'; choose one of auto"),
    (lambda: protect(IMAGES, labels=[0, 1, 0, 1], method_options={"pgd_steps": 0.5}), "pgd_steps"),
    (lambda: verify("nowhere", holdout=1.0), "invalid holdout 1.0: must be strictly between 0 and 1"),
    (lambda: verify("nowhere", lr=0.0), "invalid lr 0.0: must be > 0"),
])
def test_a_bad_value_is_a_value_error_naming_the_keyword(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numbers_and_paths_of_other_kinds_are_taken():
    opts = ProtectOptions.resolve(seed=np.int64(3), quality=np.int32(90), eps=np.float32(0.125), keep_metadata=np.bool_(True))
    assert type(opts.seed) is int and type(opts.quality) is int and opts.keep_metadata is True
    from pathlib import Path

    assert VerifyOptions.resolve(cache_dir=Path("/tmp/x"), threshold=1).cache_dir == "/tmp/x"


@pytest.mark.parametrize("function", [protect, verify])
def test_an_unknown_keyword_is_a_type_error_naming_it(function):
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        function("nowhere", epsilon="8/255")


def test_a_function_whose_keywords_drift_from_the_declaration_is_refused_at_import():
    @dataclasses.dataclass(frozen=True)
    class Declared:
        seed: int = param(0, "The seed.")
        budget: str = param("quick", "The budget.", choices=("quick", "standard"))

    def other_default(src, *, seed: int = 1, budget: str = "quick"):
        """Run."""

    def missing(src, *, seed: int = 0):
        """Run."""

    for function in (other_default, missing):
        with pytest.raises(TypeError, match="parameters differ from Declared's options"):
            takes_options(Declared, own=("src",))(function)

    def right(src, *, seed: int = 0, budget: str = "quick"):
        """Run."""

    assert "seed (int, default 0)" in takes_options(Declared, own=("src",))(right).__doc__


def _cli_params(command: click.Command) -> dict[str, click.Parameter]:
    with click.Context(command) as ctx:
        return {p.name: p for p in command.get_params(ctx) if "--help" not in p.opts}


@pytest.mark.parametrize("function, declared, command", COMMANDS)
def test_cli_options_and_sdk_keywords_are_the_same_set(function, declared, command):
    cli_names = set(_cli_params(command)) - CLI_ONLY
    sdk_names = set(inspect.signature(function).parameters) - SDK_ONLY
    assert cli_names == sdk_names, (cli_names ^ sdk_names)
    for option in options_of(declared):  # the same flag, default and help as declared
        param_ = _cli_params(command)[option.keyword]
        assert param_.opts[-1] == option.flags[-1] and param_.help.startswith(option.spec.help), option.keyword
        if not option.spec.pairs:
            assert param_.default == option.signature_default, option.keyword


def test_the_cli_reports_a_bad_value_like_the_sdk_with_exit_2(tmp_path):
    result = CliRunner().invoke(cli.main, ["protect", str(tmp_path), "--size", "7"])
    assert result.exit_code == 2 and "ueguard: error: invalid size 7: must be from 8 to 1024" in result.output
    result = CliRunner().invoke(cli.main, ["verify", str(tmp_path), "--lr", "-1"])
    assert result.exit_code == 2 and "invalid lr -1.0: must be > 0" in result.output, result.output


def test_cli_help_lists_the_declared_help_without_importing_the_sdk_for_the_group():
    import subprocess
    import sys

    code = "import sys, ueguard.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    result = CliRunner().invoke(cli.main, ["verify", "--help"])
    assert result.exit_code == 0 and "--max-pixels" in result.output and "--holdout FRACTION" in result.output
