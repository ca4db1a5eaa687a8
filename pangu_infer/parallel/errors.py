"""Errors of multi-process runs (no torch import, so the CLI can catch them cheaply)."""


class ParallelStartupError(RuntimeError):
    """A rank failed or never arrived while the tensor-parallel group was starting; names the rank."""
