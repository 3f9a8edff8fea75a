"""``sage finetune methods``: the training methods there are, built in and from plugins."""

from __future__ import annotations

import json
from typing import Any

import click

from ._common import command


@command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def methods_command(as_json: bool) -> None:
    """List the training methods: built in, and those other packages register (entry-point
    group sage_finetune.methods); a plugin that cannot be loaded is listed as broken."""
    from ..methods import get_method, method_entries

    rows: list[dict[str, Any]] = []
    for entry in method_entries():  # every plugin loaded: the broken ones say so
        row: dict[str, Any] = {"name": entry.name, "origin": entry.origin, "error": entry.error}
        row["status"] = "broken" if entry.broken else "ok"
        if not entry.broken:
            unit = get_method(entry.name)
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
