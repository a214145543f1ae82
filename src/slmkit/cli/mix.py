"""`slmkit mix`: specialists of one tokenizer mixed by total probability, as a store model."""

from __future__ import annotations

from typing import Annotated

import typer

from slmkit.cli.common import JsonOpt, handle_errors, print_json
from slmkit.route.mix import SHARE


@handle_errors
def mix(
    specialists: Annotated[list[str], typer.Argument(help="Store models sharing one tokenizer (two or more).", show_default=False)],
    name: Annotated[str, typer.Option("--name", help="Name of the mixture in the store.")],
    prior: Annotated[str | None, typer.Option("--prior", help="Prior weights, one per specialist, comma-separated (default: equal).")] = None,
    share: Annotated[float, typer.Option("--share", help="Share of the weight returned to the prior after every token, so that a conversation can change domain (0: exact Bayes).")] = SHARE,
    as_json: JsonOpt = False,
) -> None:
    """Mix specialists: each next token's distribution is sum_d p(d | text so far) p(token | text, d), the domain
    weights updated by Bayes from each specialist's likelihood of the text (no router is trained)."""
    from slmkit.route.mix import mix_stage

    try:
        weights = [float(x) for x in prior.split(",")] if prior else None
    except ValueError:
        raise typer.BadParameter(f"--prior {prior!r}: give numbers separated by commas, e.g. 0.5,0.5") from None
    card = mix_stage(specialists, name=name, prior=weights, share=share)
    if as_json:
        print_json(card)
        return
    typer.echo(f"made {card.name}: a mixture of {', '.join(specialists)} (prior {', '.join(f'{p:.2f}' for p in card.settings['prior'])}, "
               f"share {share}); run it as any model: slmkit run {card.name} ...")
