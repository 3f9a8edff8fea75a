"""``sage finetune methods``: the training methods there are, built in and from plugins."""

from __future__ import annotations

import json

import click

from ._common import command


@command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def methods_command(as_json: bool) -> None:
    """List the training methods: built in, and those other packages register (entry-point
    group sage_finetune.methods); a plugin that cannot be loaded is listed as broken."""
    from ..errors import FinetuneError
    from ..methods import get_method, method_entries

    rows = []
    for entry in method_entries():
        row = {"name": entry.name, "origin": entry.origin, "status": "ok", "error": entry.error}
        if entry.broken:
            row["status"] = "broken"
        else:
            try:
                unit = get_method(entry.name)
            except FinetuneError as exc:  # pragma: no cover - entries() loaded it already
                row.update(status="broken", error=str(exc))
            else:
                row.update(formats=list(unit.formats), description=unit.description)
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"methods": rows}, indent=2))
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        if row["status"] == "broken":
            click.echo(f"{row['name']:<{width}}  broken ({row['origin']})")
            continue
        origin = "" if row["origin"] == "built-in" else f" [{row['origin']}]"
        click.echo(f"{row['name']:<{width}}  {row['description']}{origin}")
        click.echo(f"{'':<{width}}  reads: {', '.join(row['formats'])}")
    for row in rows:
        if row["status"] == "broken":
            click.echo(f"broken: {row['error']}", err=True)
