"""The `factory` command line. Each command group lives in its own module of this package.

Errors: a `FactoryError` (bad input, missing file, impossible budget) prints one line on stderr and exits 2;
typer's own usage errors also exit 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from factory.errors import FactoryError

app = typer.Typer(
    name="factory",
    help="Design small language models for a named device: genomes, training, search, ONNX export, profiling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module, sub-app name or None for top-level commands). A module that is absent is skipped.
_COMMAND_MODULES = (
    ("factory.cli.genome", "genome"),
    ("factory.cli.model_commands", None),
    ("factory.cli.targets", "targets"),
    ("factory.cli.profile", None),
    ("factory.cli.profiles", "profiles"),
    ("factory.cli.export", None),
    ("factory.cli.search", None),
    ("factory.cli.run", None),
)


def _register() -> None:
    for module_name, group in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        if group is None:
            module.register(app)
        else:
            app.add_typer(module.app, name=group)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except FactoryError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
