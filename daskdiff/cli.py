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


@main.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--where", default=None,
              help='Quanta to run, e.g. "visit in (1000, 1001) and detector < 10".')
@click.option("--run", "run_name", default=None, help="Run name (default: <coaddName>Diff).")
@click.option("--cluster", default="local", show_default=True,
              help="sync, local, tcp://HOST:PORT or slurm:PROFILE.")
@click.option("--workers", type=int, default=None, help="Local workers or maximum Slurm jobs.")
@click.option("--attempts", type=int, default=3, show_default=True,
              help="Tries of a quantum that fails with a non-daskdiff error.")
@click.option("--stamps", "n_stamps", type=int, default=20, show_default=True,
              help="Write stamps of this many of the brightest DIA sources (0: none).")
def run_command(pipeline: str, repo: str, where: str | None, run_name: str | None,
                cluster: str, workers: int | None, attempts: int, n_stamps: int) -> None:
    """Run PIPELINE on every selected (visit, detector) of REPO; rerunning resumes."""
    from .repository import Repository
    from .workflow import load_pipeline
    from .workflow.campaign import run_campaign, write_campaign_stamps

    spec = load_pipeline(pipeline)
    repository = Repository.open(repo)
    summary = run_campaign(spec, repository, run=run_name, where=where, cluster=cluster,
                           workers=workers, attempts=attempts,
                           progress=lambda message: click.echo(message, err=True))
    click.echo(summary.format())
    page = write_campaign_stamps(repository, spec, summary.run, n_brightest=n_stamps)
    if page is not None:
        click.echo(f"stamps of the brightest DIA sources: {page}")


@main.command("status")
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--run", "run_name", required=True, help="The run to show.")
@click.option("--slowest", type=int, default=5, show_default=True,
              help="How many of the slowest quanta to list.")
def status_command(repo: str, run_name: str, slowest: int) -> None:
    """Show the ledger of a run: counts, failures with reasons, the slowest quanta."""
    from .repository import Repository

    ledger = Repository.open(repo).ledger
    ledger.get_run(run_name)
    counts = ledger.counts(run_name)
    click.echo(f"run {run_name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for quantum in ledger.quanta(run_name, state="failed"):
        click.echo(f"  failed visit {quantum.visit} detector {quantum.detector} "
                   f"({quantum.error_kind}, {quantum.attempts} attempts): {quantum.reason}")
    done = [q for q in ledger.quanta(run_name, state="done") if q.seconds is not None]
    for quantum in sorted(done, key=lambda q: -q.seconds)[:slowest]:
        click.echo(f"  slow visit {quantum.visit} detector {quantum.detector}: "
                   f"{quantum.seconds:.1f} s, {quantum.qa.get('n_dia_sources', 0)} DIA sources")


# subcommands from other modules
from .simulate.cli import simulate  # noqa: E402

main.add_command(simulate)
from .detect.cli import stamps  # noqa: E402

main.add_command(stamps)
from .subtract.cli import subtract_command  # noqa: E402

main.add_command(subtract_command)
