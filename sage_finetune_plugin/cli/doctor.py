"""``sage finetune doctor``: the training stack, the device and the precision on this machine."""

from __future__ import annotations

import json

import click

from ._common import command, status


@command("doctor")
@click.option(
    "--bench",
    is_flag=True,
    help="Measure fp32 against bf16 on this CPU again (the precision probe, about a second) "
    "and cache the verdict runs use.",
)
@click.option("--model", metavar="NAME", help="The model whose shapes the probe uses.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads the probe runs on.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def doctor_command(bench: bool, model: str | None, threads: int | None, as_json: bool) -> None:
    """Show the training stack, the device and the precision a run gets on this machine."""
    from ..doctor import machine_report

    if bench:
        status("Timing fp32 against bf16 autocast on this CPU ...")
    report = machine_report(model, bench=bench, threads=threads)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(
        " · ".join(f"{name} {version}" for name, version in report.versions.items() if version)
    )
    cpu = report.cpu
    click.echo(f"device     {report.device}")
    click.echo(
        f"cpu        {cpu['cpu']} · {cpu['capability']} · bf16 instructions: "
        f"{cpu['bf16_isa'] or 'none'} · {report.threads} thread(s) · oneDNN {cpu['onednn']}"
    )
    click.echo(f"precision  {report.precision}: {report.precision_reason}")
    if report.probe is not None and report.probe.reason() not in report.precision_reason:
        click.echo(f"probe      {report.probe.reason()}")
    for note in report.notes:
        click.echo(f"note       {note}")
