"""The ``daskdiff`` command line."""

from __future__ import annotations

import sys

import click

from .errors import DaskdiffError

__all__ = ["main"]


class _Group(click.Group):
    """A click group that turns daskdiff errors into one clear line and exit status 2."""

    def invoke(self, ctx: click.Context):  # noqa: D102
        try:
            return super().invoke(ctx)
        except DaskdiffError as error:
            click.secho(f"daskdiff: error ({error.kind}): {error}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="daskdiff")
def main() -> None:
    """daskdiff: difference-image analysis for wide-field time-domain surveys, on Dask."""


# subcommands from other modules
