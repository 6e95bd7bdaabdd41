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
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar (else one line per quantum).")
def run_command(pipeline: str, repo: str, where: str | None, run_name: str | None,
                cluster: str, workers: int | None, attempts: int, n_stamps: int,
                progress: bool) -> None:
    """Run PIPELINE on every selected (visit, detector) of REPO; rerunning resumes."""
    from .repository import Repository
    from .workflow import load_pipeline
    from .workflow.campaign import run_campaign, write_campaign_stamps

    spec = load_pipeline(pipeline)
    repository = Repository.open(repo)
    summary = run_campaign(spec, repository, run=run_name, where=where, cluster=cluster,
                           workers=workers, attempts=attempts, progress_bar=progress,
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
@click.option("--sigma", type=float, default=5.0, show_default=True,
              help="QA outliers: robust standard deviations from the run's median.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def status_command(repo: str, run_name: str, slowest: int, sigma: float,
                   as_json: bool) -> None:
    """Show a run's ledger: counts, failures, slowest quanta, peak memory, QA outliers."""
    import json

    from .repository import Repository
    from .workflow.report import format_status, run_report

    report = run_report(Repository.open(repo).ledger, run_name, slowest=slowest,
                        threshold=sigma)
    if as_json:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1,
                              default=str))
    else:
        click.echo(format_status(report))


@main.command("rerun")
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--run", "run_name", required=True, help="The run whose quanta to rerun.")
@click.option("--failed", is_flag=True, help="Rerun the failed quanta.")
@click.option("--where", default=None,
              help='Rerun the quanta matching ledger fields and QA figures, e.g. '
                   '"noise_ratio > 1.2" (with --failed, both must hold).')
@click.option("--set", "overrides", multiple=True, metavar="TASK.KEY=VALUE",
              help="Config override, e.g. subtract.mode=convolveScience (repeatable; needs "
                   "--into).")
@click.option("--into", default=None,
              help="Write to this new run (default: the same run); it stores the resolved "
                   "config with the overrides.")
@click.option("--cluster", default="local", show_default=True,
              help="sync, local, tcp://HOST:PORT or slurm:PROFILE.")
@click.option("--workers", type=int, default=None, help="Local workers or maximum Slurm jobs.")
@click.option("--attempts", type=int, default=3, show_default=True,
              help="Tries of a quantum that fails with a non-daskdiff error.")
def rerun_command(repo: str, run_name: str, failed: bool, where: str | None,
                  overrides: tuple[str, ...], into: str | None, cluster: str,
                  workers: int | None, attempts: int) -> None:
    """Rerun a selection of RUN's quanta in REPO, optionally with config overrides."""
    from .repository import Repository
    from .workflow.campaign import rerun_campaign

    summary = rerun_campaign(Repository.open(repo), run=run_name, failed=failed, where=where,
                             overrides=overrides, into=into, cluster=cluster, workers=workers,
                             attempts=attempts,
                             progress=lambda message: click.echo(message, err=True))
    click.echo(summary.format())


@main.command("report")
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--run", "runs", required=True, multiple=True,
              help="A run to report (repeat to compare runs side by side).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Directory for report.json and report.md (default: REPO/runs/RUN/report).")
@click.option("--sigma", type=float, default=5.0, show_default=True,
              help="QA outliers: robust standard deviations from the run's median.")
def report_command(repo: str, runs: tuple[str, ...], output: str | None, sigma: float) -> None:
    """Write a campaign report of one or more runs: counts, failures, timings, memory, QA."""
    from .repository import Repository
    from .workflow.report import write_report

    repository = Repository.open(repo)
    out = output or repository.root / "runs" / runs[0] / "report"
    page = write_report(repository.ledger, runs, out, threshold=sigma)
    click.echo(f"report: {page} (and {page.with_suffix('.json').name})")


# subcommands from other modules
from .simulate.cli import simulate  # noqa: E402

main.add_command(simulate)
from .detect.cli import stamps  # noqa: E402

main.add_command(stamps)
from .subtract.cli import subtract_command  # noqa: E402

main.add_command(subtract_command)
