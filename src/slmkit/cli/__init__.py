"""The `slmkit` command: a thin layer over the Python API; errors print what to do and exit 1."""

from __future__ import annotations

import typer

from slmkit.cli import data, distill, doctor, evaluate, export, finetune, generate, lowrank, mix, models, ngram, prune, quantize, recipe, route, serve
from slmkit.cli.common import setup_output

app = typer.Typer(
    name="slmkit",
    help="Make small language models and run them on the machine you have, offline.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models.app, name="models")
app.add_typer(data.app, name="data")
app.add_typer(route.app, name="route")
app.add_typer(recipe.app, name="recipe")
app.command("pull")(models.pull_cmd)
app.command("run")(generate.run)
app.command("chat")(generate.chat)
app.command("eval")(evaluate.eval_cmd)
app.command("compare")(evaluate.compare)
app.command("export")(export.export)
app.command("quantize")(quantize.quantize)
app.command("prune")(prune.prune)
app.command("lowrank")(lowrank.lowrank)
app.command("distill")(distill.distill)
app.command("finetune")(finetune.finetune)
app.command("merge")(finetune.merge)
app.command("mix")(mix.mix)
app.command("ngram")(ngram.ngram)
app.command("serve")(serve.serve)
app.command("ps")(serve.ps)
app.command("doctor")(doctor.doctor)


def _version(value: bool) -> None:
    if value:
        from slmkit.version import __version__

        typer.echo(f"slmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")) -> None:
    """Make small language models and run them on the machine you have, offline."""
    setup_output()
    _sweep()


def _sweep() -> None:
    """What killed commands left behind (staging folders, export temporaries whose process is gone): every command
    clears it first. A problem here (SLMKIT_HOME unusable) is left for the command itself to report."""
    from slmkit.errors import SlmkitError
    from slmkit.store import Store

    try:
        store = Store()
        store.sweep()
        store.sweep_exports()
    except (SlmkitError, OSError):
        pass


def main() -> None:
    app()
