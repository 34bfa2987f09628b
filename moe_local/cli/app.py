"""`moe-local`: the Typer application. Each group of commands lives in its own module and registers itself."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="moe-local",
    help="Run Mixture-of-Experts models larger than your GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules defining `register(app)`; a module that does not exist yet is simply skipped.
COMMAND_MODULES = (
    "moe_local.cli.run_cmds",  # generate, chat, inspect
    "moe_local.cli.quant_cmds",  # quantize, eval
    "moe_local.cli.cache_cmds",  # report, simulate
    "moe_local.cli.serve_cmd",  # serve
    "moe_local.cli.bench_cmd",  # bench
)


def register_commands(target: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(target)


try:
    register_commands(app)
except KeyboardInterrupt:  # Ctrl-C while torch is still importing: a person expects no traceback
    sys.stderr.write("interrupted\n")
    sys.exit(130)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
