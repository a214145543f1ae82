"""What every command shares: consoles, the error handler, and the sampling options (defaults live in SamplingParams)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from slmkit.engine.sampling import SamplingParams
from slmkit.errors import SlmkitError

F = TypeVar("F", bound=Callable[..., Any])

_D = SamplingParams()


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON (a new model's card; what an export wrote) instead of the summary.")]


def print_json(obj: Any) -> None:
    """A command's result on stdout as JSON (progress goes to stderr, so the output parses)."""
    import json
    from dataclasses import asdict, is_dataclass

    typer.echo(json.dumps(asdict(obj) if is_dataclass(obj) else obj, indent=2, default=str))


def print_result(obj: Any, as_json: bool, summary: str) -> None:
    """A command's result: JSON with --json, else its one-line summary."""
    if as_json:
        print_json(obj)
    else:
        typer.echo(summary)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


def out_console() -> Console:
    """Standard output; piped to a file or another program it is not cut to 80 columns (tables keep every column)."""
    import sys

    return Console(highlight=False, width=None if sys.stdout.isatty() else 250)


def setup_output() -> None:
    """Progress on stderr; silence transformers' own bars and warnings, which would interleave with ours."""
    import transformers

    from slmkit import progress

    progress.enable(err_console())
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def handle_errors(fn: F) -> F:
    """Turn SlmkitError into a two-line message (what is wrong, what to do) and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SlmkitError as exc:
            con = err_console()
            con.print(f"[bold red]error:[/] {exc.message}", soft_wrap=True)
            if exc.hint:
                con.print(exc.hint, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


ModelOpt = Annotated[str | None, typer.Argument(help="Model name in the store (default: the embedded SmolLM2-135M-Instruct).")]
BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="Inference backend: torch, llamacpp or auto.")]
# run and chat take what serve takes: llama.cpp where the model has a GGUF (several times faster at batch 1), else PyTorch
RunBackendOpt = Annotated[str, typer.Option("--backend", "-b", help="auto (llama.cpp where the model has a GGUF, else PyTorch), llamacpp or torch.")]
Temperature = Annotated[float | None, typer.Option(help=f"Sampling temperature; 0 is greedy. [default: {_D.temperature}]")]
TopP = Annotated[float | None, typer.Option("--top-p", help=f"Nucleus sampling mass. [default: {_D.top_p}]")]
TopK = Annotated[int | None, typer.Option("--top-k", help=f"Sample among the k likeliest tokens; 0 is off. [default: {_D.top_k}]")]
RepPenalty = Annotated[
    float | None, typer.Option("--repetition-penalty", help=f"Penalty on recently seen tokens; 1 is off. [default: {_D.repetition_penalty}]")
]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", "-n", help=f"Most tokens to generate. [default: {_D.max_tokens}]")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop when this string appears (repeatable).")]
Seed = Annotated[int | None, typer.Option(help="Random seed: the same seed gives the same output.")]
Speculative = Annotated[int | None, typer.Option("--speculative", help="Draft up to N tokens by prompt lookup and check them in one "
                        "pass: faster where the answer repeats the prompt, paused where checks cost more than they save; greedy "
                        f"gives the same text, sampling the same distribution (PyTorch engine). [default: {_D.speculative}: off]")]


def model_or_default(model: str | None) -> str:
    """The model a command names; the default model (imported from its package on first use) when it names none
    or names the default itself."""
    from slmkit.config import DEFAULT_MODEL
    from slmkit.sources.importer import ensure_default

    return ensure_default() if model in (None, DEFAULT_MODEL) else model


def sampling_kwargs(**given: Any) -> dict[str, Any]:
    """Keep only the options the user set, so SamplingParams' defaults apply to the rest."""
    return {k: v for k, v in given.items() if v is not None and v != []}
