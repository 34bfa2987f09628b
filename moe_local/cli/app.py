"""`moe-local`: the Typer application. Each group of commands lives in its own module and registers itself."""

from __future__ import annotations

import importlib

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
    "moe_local.cli.cache_cmds",  # report, simulate, bench
)

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:
        if _exc.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
