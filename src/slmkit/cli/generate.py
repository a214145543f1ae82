"""`slmkit run` (one streamed answer) and `slmkit chat` (an interactive, streamed, multi-turn session)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from slmkit.cli.common import (
    RunBackendOpt, MaxTokens, ModelOpt, RepPenalty, Seed, Speculative, Stop, Temperature, TopK, TopP, err_console,
    handle_errors, sampling_kwargs,
)
from slmkit.errors import PromptTooLong, SlmkitError
from slmkit.loading import load
from slmkit.model import Generation, Model


def _stream_out(gen: Generation) -> bool:
    """Print pieces as they come; Ctrl-C stops this answer only. Returns False when interrupted."""
    try:
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        gen.close()
        sys.stdout.write("\n")
        err_console().print("[dim][stopped][/]")
        return False
    sys.stdout.write("\n")
    sys.stdout.flush()
    return True


def _print_stats(model: Model, gen: Generation) -> None:
    s = gen.stats
    err_console().print(
        f"[dim]prompt {s.prompt_tokens} tokens · {s.completion_tokens} generated · "
        f"first token {s.time_to_first_token_s:.2f}s · decode {s.decode_tokens_per_s:.1f} tokens/s · "
        f"finish: {s.finish_reason}[/]"
    )
    if s.checks:
        err_console().print(f"[dim]speculative: {s.checks} checks · {s.drafted_tokens} drafted · {s.accepted_tokens} kept "
                            f"({s.accepted_tokens / s.drafted_tokens:.0%})[/]")
    weights = model.domain_weights(gen)
    if weights is not None:  # a mixture of specialists: how much each one speaks for this conversation now
        err_console().print("[dim]domain weights: " + ", ".join(f"{n} {w:.2f}" for n, w in weights.items()) + "[/]")


@handle_errors
def run(
    args: Annotated[list[str] | None, typer.Argument(help="[MODEL] PROMPT. With no prompt, it is read from stdin.", show_default=False)] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion, no chat template (for base models).")] = False,
    system: Annotated[str | None, typer.Option("--system", help="System prompt (chat models).")] = None,
    backend: RunBackendOpt = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print token counts and speed to stderr.")] = False,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    repetition_penalty: RepPenalty = None,
    max_tokens: MaxTokens = None,
    stop: Stop = None,
    seed: Seed = None,
    speculative: Speculative = None,
) -> None:
    """Answer one prompt, streamed to the terminal."""
    args = list(args or [])
    if len(args) > 2:
        raise SlmkitError(f"expected [MODEL] PROMPT, got {len(args)} arguments", 'Quote the prompt: slmkit run "your prompt"')
    piped = sys.stdin is not None and not sys.stdin.closed and not sys.stdin.isatty()  # stdin may be closed (<&-)
    if not args or (len(args) == 1 and piped and _is_model_name(args[0])):
        try:
            prompt = sys.stdin.read() if piped else ""
        except UnicodeDecodeError as exc:
            raise SlmkitError(f"the prompt on stdin is not UTF-8 text ({exc.reason} at byte {exc.start})", "Pipe UTF-8 text.") from None
        model_name = args[0] if args else None
    else:
        model_name, prompt = (args[0], args[1]) if len(args) == 2 else (None, args[0])
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # invalid bytes in argv arrive as lone surrogates
        raise SlmkitError("the prompt is not valid UTF-8 text", "Pass the prompt as UTF-8 (check the terminal's encoding).") from None
    if not prompt.strip():
        raise SlmkitError("no prompt given", 'Pass one: slmkit run "your prompt" (or pipe it on stdin).')
    sampling = sampling_kwargs(
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
        max_tokens=max_tokens, stop=stop, seed=seed, speculative=speculative,
    )
    model = load(model_name, backend=backend)
    if raw or not model.backend.has_chat_template:
        gen = model.stream(prompt, **sampling)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        gen = model.stream_chat(messages, **sampling)
    completed = _stream_out(gen)
    if verbose:
        _print_stats(model, gen)
    if not completed:
        raise typer.Exit(130)


def _is_model_name(arg: str) -> bool:
    from slmkit.store import NAME_RE, Store

    return bool(NAME_RE.match(arg)) and Store().exists(arg)


CHAT_HELP = """Commands:
  /system TEXT   set the system prompt (no text: show it)
  /reset         forget the conversation (keeps the system prompt)
  /exit, /bye    leave (or Ctrl-D)
  Ctrl-C         stop the current answer"""


@handle_errors
def chat(
    model_name: ModelOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt to start with.")] = None,
    backend: RunBackendOpt = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print token counts and speed after each answer.")] = False,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    repetition_penalty: RepPenalty = None,
    max_tokens: MaxTokens = None,
    stop: Stop = None,
    seed: Seed = None,
    speculative: Speculative = None,
) -> None:
    """Chat with a model: streamed answers, multi-turn history, /system, /reset, /exit."""
    sampling = sampling_kwargs(
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
        max_tokens=max_tokens, stop=stop, seed=seed, speculative=speculative,
    )
    model = load(model_name, backend=backend)
    if not model.backend.has_chat_template:
        raise SlmkitError(f"{model.name} has no chat template (a base model?)", f'Use plain completion: slmkit run {model.name} --raw "text"')
    ChatSession(model, system, sampling, verbose).loop()


class ChatSession:
    """The state of one interactive chat: system prompt and history; reads lines until /exit or EOF."""

    def __init__(self, model: Model, system: str | None, sampling: dict[str, Any], verbose: bool = False) -> None:
        self.model = model
        self.system = system
        self.sampling = sampling
        self.verbose = verbose
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def loop(self) -> None:
        err = err_console()
        err.print(f"[dim]Chatting with {self.model.name}. /help for commands, Ctrl-D or /exit to leave.[/]")
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                sys.stdout.write("\n")
                return
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                err.print("[dim]Use Ctrl-D or /exit to leave.[/]")
                continue
            if not self.handle(line.strip()):
                return

    def handle(self, line: str) -> bool:
        """Act on one input line; False means leave."""
        err = err_console()
        if not line:
            return True
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/bye", "/quit"):
                return False
            if cmd == "/reset":
                self.history.clear()
                err.print("[dim]Conversation cleared.[/]")
            elif cmd == "/system":
                if rest.strip():
                    self.system = rest.strip()
                    err.print("[dim]System prompt set.[/]")
                else:
                    err.print(f"[dim]System prompt: {self.system or '(none)'}[/]")
            elif cmd in ("/help", "/?"):
                err.print(CHAT_HELP)
            else:
                err.print(f"Unknown command {cmd}.\n{CHAT_HELP}")
            return True
        self.history.append({"role": "user", "content": line})
        try:
            gen = self._start()
        except PromptTooLong as exc:
            self.history.pop()
            err.print(f"[red]{exc.message}[/]\n{exc.hint}")
            return True
        _stream_out(gen)
        self.history.append({"role": "assistant", "content": gen.text})
        if self.verbose:
            _print_stats(self.model, gen)
        return True

    def _start(self) -> Generation:
        """Start the answer; when the history no longer fits the context, drop the oldest turns first."""
        while True:
            try:
                return self.model.stream_chat(self.messages(), **self.sampling)
            except PromptTooLong:
                if len(self.history) <= 1:
                    raise
                del self.history[:2]
                err_console().print("[dim](dropped the oldest turn to fit the context window)[/]")
