"""`slmkit distill`: train a student from a teacher on your data (cached teacher log-probabilities, checkpoints,
resume), the student installed in the store with its lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmkit.cli.common import JsonOpt, handle_errors, model_or_default, print_json
from slmkit.train.distill import ALPHA, SEQ_LEN, TAU
from slmkit.train.loop import TrainConfig
from slmkit.train.teacher import TOP_K

_D = TrainConfig()


@handle_errors
def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="Store model whose outputs the student learns; or an OpenAI-compatible endpoint "
                                        "(http://HOST:PORT/v1): a black box whose answers to your prompts the student learns.")],
    student: Annotated[str, typer.Option("--student", help="Store model to train (same tokenizer), e.g. a pruned child of the teacher; "
                                        "or new:layers=12,intermediate=768 (also hidden, heads, kv_heads) for a fresh one.")],
    data: Annotated[list[Path], typer.Option("--data", help="Training text: .txt, .jsonl ({text}, {messages}, Alpaca) or .csv. Repeatable.")],
    loss: Annotated[str, typer.Option("--loss", help="fkl (forward KL), rkl (reverse KL, MiniLLM) or jsd (generalized JSD).")] = "fkl",
    temperature: Annotated[float, typer.Option("--temperature", help="Softens both distributions.")] = TAU,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the distillation loss; the rest is plain next-token loss (0: no teacher).")] = ALPHA,
    top_k: Annotated[int, typer.Option("--top-k", help="Teacher log-probabilities kept per position in the cache.")] = TOP_K,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training window.")] = SEQ_LEN,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: --epochs over the data).")] = None,
    epochs: Annotated[float, typer.Option("--epochs")] = _D.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per micro-batch.")] = _D.batch_size,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.")] = _D.grad_accum,
    lr: Annotated[float, typer.Option("--lr")] = _D.lr,
    warmup: Annotated[float, typer.Option("--warmup", help="Share of the steps with linear warmup.")] = _D.warmup,
    seed: Annotated[int, typer.Option("--seed", help="Shuffling and the validation split.")] = _D.seed,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = _D.checkpoint_every,
    eval_every: Annotated[int, typer.Option("--eval-every")] = _D.eval_every,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast (fast where the CPU has AVX-512 BF16 or AMX).")] = _D.bf16,
    text_column: Annotated[str | None, typer.Option("--text-column", help="CSV: the column of text.")] = None,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="CSV: the prompt column (with --response-column).")] = None,
    response_column: Annotated[str | None, typer.Option("--response-column", help="CSV: the response column.")] = None,
    hidden_weight: Annotated[float, typer.Option("--hidden-weight", help="Also align the student's final hidden states with the teacher's (Minitron); keeps the teacher in memory.")] = 0.0,
    synthetic: Annotated[int, typer.Option("--synthetic", help="Also train on N samples the teacher writes from prompts of your data.")] = 0,
    synthetic_max_tokens: Annotated[int, typer.Option("--synthetic-max-tokens", help="Tokens per teacher-written sample.")] = 128,
    teacher_model: Annotated[str | None, typer.Option("--teacher-model", help="The model to ask at a --teacher URL (default: its first).")] = None,
    teacher_key: Annotated[str | None, typer.Option("--teacher-key", envvar="SLMKIT_TEACHER_API_KEY", help="API key for a --teacher URL.")] = None,
    teacher_rate: Annotated[float, typer.Option("--teacher-rate", help="Most requests per second to a --teacher URL (0: no limit).")] = 0.0,
    name: Annotated[str | None, typer.Option("--name", help="Name of the trained student (default STUDENT-distilled).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run of this --name from its last checkpoint.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Distill a teacher into a student: KL against the teacher's cached top-k log-probabilities, mixed with the
    next-token loss; checkpoints, --resume, validation perplexity; the student goes into the store."""
    from slmkit.train.distill import distill_stage

    cfg = TrainConfig(steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
                      seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every, bf16=bf16)
    read = {k: v for k, v in {"text_column": text_column, "prompt_column": prompt_column, "response_column": response_column}.items() if v}
    teacher, student = model_or_default(teacher), model_or_default(student)  # the default model: imported on first use
    card = distill_stage(teacher, student, data, loss=loss, tau=temperature, alpha=alpha, top_k=top_k, seq_len=seq_len,
                         config=cfg, name=name, resume=resume, read=read, synthetic=synthetic,
                         synthetic_max_tokens=synthetic_max_tokens, hidden_weight=hidden_weight, teacher_model=teacher_model,
                         teacher_key=teacher_key, teacher_rate=teacher_rate)
    if as_json:
        print_json(card)
        return
    s = card.settings
    v = s["validation_perplexity"]
    typer.echo(f"made {card.name}: {s['steps']} steps, {s['tokens']:,} tokens"
               + (f"; validation perplexity {v['before']:.3f} -> {v['after']:.3f}" if v["before"] and v["after"] else ""))
