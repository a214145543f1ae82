"""`slmkit finetune` (LoRA, QLoRA, prompt tuning or full fine-tuning on chat, instruction, CSV or text data; or a
classifier from a text and a label column) and `slmkit merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmkit.card import human_count
from slmkit.cli.common import JsonOpt, ModelOpt, handle_errors, model_or_default, print_json
from slmkit.train.finetune import LORA_ALPHA, LORA_DROPOUT, LORA_R, LR, SEQ_LEN, VIRTUAL_TOKENS
from slmkit.train.loop import TrainConfig

_D = TrainConfig()


@handle_errors
def finetune(
    model: ModelOpt = None,
    data: Annotated[list[Path] | None, typer.Option("--data", help="Chat JSON lines ({messages}), Alpaca JSON, CSV (with --prompt-column/--response-column) or text. Repeatable.")] = None,
    method: Annotated[str, typer.Option("--method", help="lora (an adapter over the frozen model), qlora (the same over integer weights: less memory), prompt (prompt tuning: learned virtual tokens) or full.")] = "lora",
    qlora_base: Annotated[str, typer.Option("--qlora-base", help="qlora on a float model: hold it as int4 or int8 while training (a model from slmkit quantize is used as it is).")] = "int4",
    r: Annotated[int, typer.Option("--r", help="LoRA rank.")] = LORA_R,
    alpha: Annotated[int, typer.Option("--alpha", help="LoRA alpha (the update is scaled by alpha / r).")] = LORA_ALPHA,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.")] = LORA_DROPOUT,
    virtual_tokens: Annotated[int, typer.Option("--virtual-tokens", help="prompt: how many learned virtual tokens go before every prompt.")] = VIRTUAL_TOKENS,
    prompt_init_text: Annotated[str | None, typer.Option("--prompt-init-text", help="prompt: start the virtual tokens from this text's embeddings (default: tokens sampled from the vocabulary).")] = None,
    target_modules: Annotated[list[str] | None, typer.Option("--target-modules", help="LoRA targets (default: every linear of the blocks). Repeatable.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training window.")] = SEQ_LEN,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: --epochs over the data).")] = None,
    epochs: Annotated[float, typer.Option("--epochs")] = _D.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size")] = _D.batch_size,
    grad_accum: Annotated[int, typer.Option("--grad-accum")] = _D.grad_accum,
    lr: Annotated[float | None, typer.Option("--lr", help=f"Learning rate. [default: lora and qlora {LR['lora']}, prompt {LR['prompt']}, full {LR['full']}]")] = None,
    seed: Annotated[int, typer.Option("--seed")] = _D.seed,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = _D.checkpoint_every,
    eval_every: Annotated[int, typer.Option("--eval-every")] = _D.eval_every,
    bf16: Annotated[bool, typer.Option("--bf16")] = _D.bf16,
    text_column: Annotated[str | None, typer.Option("--text-column")] = None,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column")] = None,
    response_column: Annotated[str | None, typer.Option("--response-column")] = None,
    task: Annotated[str, typer.Option("--task", help="generate (learn the responses) or classify (a text and a label per row: the loss on the label alone; the model answers with one of the labels).")] = "generate",
    label_column: Annotated[str | None, typer.Option("--label-column", help="classify: the label column (CSV/TSV, JSON lines or a saved Hugging Face dataset; the text is --text-column, default 'text').")] = None,
    prompt_format: Annotated[str, typer.Option("--prompt-format", help="classify: chat (the model's chat template) or plain ('TEXT\\nLabel: LABEL', for base models).")] = "chat",
    name: Annotated[str | None, typer.Option("--name", help="Name of the result (default MODEL-lora or MODEL-ft).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run of this --name from its last checkpoint.")] = False,
    grad_checkpoint: Annotated[bool | None, typer.Option("--grad-checkpoint/--no-grad-checkpoint", help="Recompute each block in backward instead of keeping its activations: far less memory, ~35-55% slower. [default: on for qlora, else on when the activations would take over a quarter of the free memory]", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Adapt a model to your data: a LoRA adapter (through peft) or full fine-tuning; loss on the responses."""
    from slmkit.errors import SlmkitError
    from slmkit.train.finetune import finetune_stage

    if not data:
        raise SlmkitError("no training data given", "Pass --data FILE (chat JSON lines, Alpaca JSON, CSV or text), repeatable.")
    model = model_or_default(model)
    cfg = TrainConfig(steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr or LR.get(method, _D.lr),
                      seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every, bf16=bf16)
    read = {k: v for k, v in {"text_column": text_column, "prompt_column": prompt_column, "response_column": response_column,
                              "label_column": label_column}.items() if v}
    card = finetune_stage(model, data, method=method, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                          seq_len=seq_len, config=cfg, name=name, resume=resume, read=read, qlora_scheme=qlora_base,
                          grad_checkpoint=grad_checkpoint, virtual_tokens=virtual_tokens, prompt_init_text=prompt_init_text,
                          task=task, prompt_format=prompt_format)
    if as_json:
        print_json(card)
        return
    s = card.settings
    v = s["validation_perplexity"]
    typer.echo(f"made {card.name} ({'full model' if method == 'full' else 'adapter over ' + model}): "
               f"{human_count(s['trainable_parameters'])} trainable parameters ({s['trainable_share']:.2%}), {s['steps']} steps"
               + (f"; validation perplexity {v['before']:.3f} -> {v['after']:.3f}" if v["before"] and v["after"] else ""))
    if task == "classify":
        labels = s["classify"]["labels"]
        typer.echo(f"a classifier over {len(labels)} labels ({', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''}): "
                   f"slmkit eval {card.name} --responses HELD_OUT [--label-column label]")


@handle_errors
def merge(
    adapter: Annotated[str, typer.Argument(help="A LoRA adapter in the store (from slmkit finetune).")],
    name: Annotated[str | None, typer.Option("--name", help="Name of the merged model (default ADAPTER-merged).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fold a LoRA adapter into its base: a plain dense model in the store."""
    from slmkit.train.finetune import merge_stage

    card = merge_stage(adapter, name=name)
    if as_json:
        print_json(card)
        return
    typer.echo(f"made {card.name}: {human_count(card.parameters)} parameters, the adapter merged into {card.settings['base']}")
