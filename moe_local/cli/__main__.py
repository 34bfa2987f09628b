"""`python -m moe_local.cli ...` is the `moe-local` command (handy in a checkout without an installed script)."""

from moe_local.cli.app import main

main()
