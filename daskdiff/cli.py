"""The ``daskdiff`` command line."""

from __future__ import annotations

import sys

import click

from .errors import DaskdiffError

__all__ = ["main"]


class _Group(click.Group):
    """A click group that turns daskdiff errors into one clear line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DaskdiffError as error:
            click.secho(f"daskdiff: error ({error.kind}): {error}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="daskdiff")
def main() -> None:
    """daskdiff: difference-image analysis for wide-field time-domain surveys, on Dask."""


@main.command("info")
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(repo: str, as_json: bool) -> None:
    """Show what the repository REPO holds: datasets, visits, coadds, runs and quanta."""
    import json

    from .repository import Repository

    repository = Repository.open(repo)
    if as_json:
        click.echo(json.dumps(repository.summary(), indent=1, default=str))
    else:
        click.echo(repository.format_summary())


# subcommands from other modules
from .simulate.cli import simulate  # noqa: E402

main.add_command(simulate)
from .detect.cli import stamps  # noqa: E402

main.add_command(stamps)
from .subtract.cli import subtract_command  # noqa: E402

main.add_command(subtract_command)
