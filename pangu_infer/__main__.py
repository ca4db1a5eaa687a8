"""`python -m pangu_infer ...`: the same as the `pangu-infer` command."""

from pangu_infer.cli import command

command()
