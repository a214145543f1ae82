"""`finetune`: adapt a model to the user's data with LoRA (through peft) or full fine-tuning, on the shared
training core (data readers and masks, the loop, checkpoints, resume). LoRA children are adapters in the store
(sources/adapters.py); full fine-tuning writes a whole model. Loss: next-token, on the response tokens of chat rows."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit import progress
from slmkit.card import ModelCard
from slmkit.compress.parents import float_parent
from slmkit.config import settings
from slmkit.data.classify import CARD_KEY as CLASSIFY_KEY, check_format
from slmkit.errors import SlmkitError
from slmkit.compress.quantize import for_training, quantize_model
from slmkit.layers.integer import Int4Linear, Int8Linear
from slmkit.layers.walk import count_params, decoder_blocks
from slmkit.sources.hf_dir import float_writer, load_float, load_tokenizer
from slmkit.card import GUARD_KEY, read_config
from slmkit.store import Store, validate_name
from slmkit.train import data as td
from slmkit.sources.forms import ADAPTER_CONFIG, QUANT_KEY, is_adapter, is_quantized, load_quantized
from slmkit.train.loop import TrainConfig, fit, with_loss_curve
from slmkit.train.losses import chunked_next_token_loss
from slmkit.train.memory import release_freed_memory, return_large_blocks

METHODS = ("lora", "qlora", "prompt", "full")
TASKS = ("generate", "classify")  # classify: a text and a label per row, the loss on the label alone
QLORA_SCHEMES = ("int4", "int8")
SEQ_LEN = 256
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
VIRTUAL_TOKENS = 20
# the usual rates: a prompt's few vectors take the largest steps (peft's examples use 3e-2), adapters faster than
# whole weights
LR = {"lora": 2e-4, "qlora": 2e-4, "prompt": 3e-2, "full": 2e-5}


ACTIVATION_SHARE = 0.25  # checkpoint by default when a step's activations would take more of the free memory


def activation_bytes(config: Any, batch: int, seq: int) -> int:
    """A generous estimate of a training step's saved activations without checkpointing (float32): per token and
    block ~16 hidden-wide, ~6 MLP-wide and 3 attention-row tensors (measured on the default model at 1024 tokens:
    ~2.4 GB; this gives 3.1 GB)."""
    per = 16 * config.hidden_size + 6 * config.intermediate_size + 3 * config.num_attention_heads * seq
    return 4 * config.num_hidden_layers * batch * seq * per


def checkpoint_by_default(method: str, config: Any, batch: int, seq: int) -> bool:
    """Gradient checkpointing unless asked: always for qlora (its point is memory), otherwise only when the step's
    activations would take more than a quarter of the memory available now (a small model on a roomy machine
    trains faster without it)."""
    import psutil

    if method == "qlora":
        return True
    return activation_bytes(config, batch, seq) > ACTIVATION_SHARE * psutil.virtual_memory().available


def block_linear_names(model: nn.Module) -> list[str]:
    """The short names of the decoder blocks' linear layers (q_proj, ..., down_proj): LoRA's default targets."""
    _, blocks = decoder_blocks(model)
    return sorted({n.rsplit(".", 1)[-1] for n, m in blocks[0].named_modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))})


def _load_base(store: Store, model: str, method: str, qlora_scheme: str) -> tuple[nn.Module, Any, Path, ModelCard, str | None]:
    """The model to train, its tokenizer, the float folder it came from, its card, and its integer form for QLoRA
    (an integer child as it is, or a float model quantized in memory; None otherwise)."""
    if method == "qlora" and is_quantized(store.require(model)):
        folder, base_card = store.require(model), store.card(model)
        with progress.step(f"Loading {model} (integer weights)"):
            net, tokenizer = for_training(load_quantized(folder)), load_tokenizer(folder)
        return net, tokenizer, folder, base_card, read_config(folder)[QUANT_KEY]["scheme"]
    folder, base_card = float_parent(store, model)
    net, tokenizer = load_float(folder, dtype=torch.float32, what=f"Loading {model}")
    if method != "qlora":
        return net, tokenizer, folder, base_card, None
    with progress.step(f"Quantizing {model} to {qlora_scheme} in memory (round to nearest)"):
        quantize_model(net, qlora_scheme)
    return net, tokenizer, folder, base_card, f"{qlora_scheme} in memory"


def _attach(net: nn.Module, model: str, folder: Path, method: str, *, r: int, alpha: int, dropout: float,
            target_modules: list[str] | None, base_quantized: str | None, virtual_tokens: int,
            prompt_init_text: str | None) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any] | None]:
    """peft's LoRA (lora, qlora) or prompt tuning around `net`: the wrapped model and what the card says of each."""
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.layer import Linear as LoraLinear

        available = block_linear_names(net)
        targets = target_modules or available
        unknown = sorted(set(targets) - set(available))
        if unknown:
            raise SlmkitError(f"no linear layers named {unknown} in {model}", f"Target modules: {', '.join(available)}")
        lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
        if base_quantized:  # peft's own LoRA layer wraps ours: base(x) + B(A(dropout(x))) * alpha / r
            lora_config._register_custom_module({Int8Linear: LoraLinear, Int4Linear: LoraLinear})
        with warnings.catch_warnings():  # peft warns of layer types it does not know: ours are registered above
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            net = get_peft_model(net, lora_config)
        return net, {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets, "base_quantized": base_quantized}, None
    if method == "prompt":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        init = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": prompt_init_text,
                "tokenizer_name_or_path": str(folder)} if prompt_init_text else {"prompt_tuning_init": PromptTuningInit.SAMPLE_VOCAB}
        net = get_peft_model(net, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens, **init))
        return net, None, {"virtual_tokens": virtual_tokens, "init": "text" if prompt_init_text else "sampled vocabulary",
                           "init_text": prompt_init_text}
    return net, None, None


def _write_adapter(staging: Path, net: nn.Module, tokenizer: Any, name: str, base: Path, folder: Path) -> None:
    """peft's adapter folder, its base named by the store folder `base`, with the float config of `folder`."""
    import json

    with progress.step(f"Writing the adapter {name}"):
        net.save_pretrained(str(staging), safe_serialization=True)
        adapter_cfg = json.loads((staging / ADAPTER_CONFIG).read_text())
        # the base's folder, where peft and transformers find it (slmkit reads the base from the card's lineage)
        adapter_cfg["base_model_name_or_path"] = str(base.resolve())
        (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_cfg, indent=2))
        tokenizer.save_pretrained(str(staging))
        base_config = read_config(folder)
        for key in (QUANT_KEY, "quantization_config", GUARD_KEY):  # the adapter applies to the base's computation,
            base_config.pop(key, None)  # float or integer: its folder is a float model's config
        (staging / "config.json").write_text(json.dumps(base_config, indent=2))


def finetune_stage(
    model: str, data: list[Path], *, method: str = "lora", r: int = LORA_R, alpha: int = LORA_ALPHA,
    dropout: float = LORA_DROPOUT, target_modules: list[str] | None = None, seq_len: int = SEQ_LEN,
    valid_fraction: float = 0.05, config: TrainConfig | None = None, name: str | None = None, resume: bool = False,
    store: Store | None = None, read: dict[str, Any] | None = None, qlora_scheme: str = "int4",
    grad_checkpoint: bool | None = None, virtual_tokens: int = VIRTUAL_TOKENS, prompt_init_text: str | None = None,
    task: str = "generate", prompt_format: str = "chat",
) -> ModelCard:
    """Fine-tune store model `model` on `data` into `name` (default MODEL-lora / MODEL-qlora / MODEL-ft).

    qlora: LoRA over the base held in integer form: a model made by `slmkit quantize` as it is, or a float model
    quantized in memory (`qlora_scheme`, round-to-nearest). Gradients pass through the integer layers without a float
    copy of their weights (layers/integer.py), so memory really drops. The adapter is peft's LoRA format; its base is
    the store model given (merged into its dequantized weights when it is an integer child).

    prompt: prompt tuning through peft (Lester et al.): `virtual_tokens` learned input vectors before every sequence,
    the model frozen; initialised from `prompt_init_text`'s token embeddings, else from tokens sampled from the
    vocabulary. The adapter is peft's prompt-tuning folder; the engines run it as virtual token ids (layers/prompt.py).

    task "classify": rows are a text and a label (`read` names the label column); each row is its own window, the
    loss falls on the label's tokens (and the end of the answer) alone, and the card records the label set and the
    prompt format (data/classify.py) so that `eval --metric accuracy` and `serve` answer with one of the labels.

    grad_checkpoint: keep only each block's input for backward and run the block again there (transformers'
    gradient checkpointing): a small model's step is dominated by its activations, not its weights (measured on the
    default model at 4 x 256 tokens: peak 5.3 GB without, 1.5 GB with), but it costs one more forward per step
    (~35-55% slower). None: `checkpoint_by_default` decides (always for qlora, whose point is memory)."""
    store = store or Store()
    if method not in METHODS:
        raise SlmkitError(f"unknown method {method!r}", f"Methods: {', '.join(METHODS)}")
    if task not in TASKS:
        raise SlmkitError(f"unknown task {task!r}", f"Tasks: {', '.join(TASKS)}")
    if (task == "classify") != bool((read or {}).get("label_column")):
        raise SlmkitError("--task classify and --label-column go together",
                          "For classification give --task classify --label-column COLUMN (and --text-column); else neither.")
    check_format(prompt_format)
    if not data:
        raise SlmkitError("no training data given", "Pass --data FILE (chat JSON lines, Alpaca JSON, CSV or text), repeatable.")
    adapter = method in ("lora", "qlora")
    if method == "prompt" and not 1 <= virtual_tokens <= 512:
        raise SlmkitError(f"--virtual-tokens must be in 1..512, got {virtual_tokens}", "Prompt tuning uses 8 to 100 as a rule.")
    if adapter and (r < 1 or alpha <= 0 or not 0 <= dropout < 1):
        raise SlmkitError("--r must be >= 1, --alpha > 0 and --dropout in [0, 1)", "Fix the values.")
    if method == "qlora" and qlora_scheme not in QLORA_SCHEMES:
        raise SlmkitError(f"unknown QLoRA base form {qlora_scheme!r}", f"Forms: {', '.join(QLORA_SCHEMES)}")
    cfg = config or TrainConfig(lr=LR[method])
    name = validate_name(name or f"{model}-{'ft' if method == 'full' else method}")
    store.check_free(name)
    net, tokenizer, folder, base_card, base_quantized = _load_base(store, model, method, qlora_scheme)
    release_freed_memory()  # what loading (and quantizing in memory) freed goes back to the system before training
    return_large_blocks()  # and a step's temporaries after each step (train/memory.py: 2.6 -> 1.5 GB peak for LoRA)
    if task == "classify" and prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise SlmkitError(f"{model} has no chat template for --prompt-format chat", "Use --prompt-format plain (a base model).")
    with progress.step("Reading and packing the data"):
        train, valid, info = td.build(tokenizer, [Path(p) for p in data], seq_len=seq_len, valid_fraction=valid_fraction,
                                      seed=cfg.seed, prompt_format=prompt_format if task == "classify" else None, **(read or {}))
    total_params = base_card.parameters or count_params(net)  # the logical count (integer weights are buffers)
    net, lora, prompt = _attach(net, model, folder, method, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                base_quantized=base_quantized, virtual_tokens=virtual_tokens, prompt_init_text=prompt_init_text)
    skip = virtual_tokens if method == "prompt" else 0  # the virtual tokens' hidden states come first
    if grad_checkpoint is None:
        grad_checkpoint = checkpoint_by_default(method, net.config, cfg.batch_size, seq_len + skip)
    if grad_checkpoint:
        if hasattr(net, "activation_checkpointing_enable"):  # transformers' name for it since 5.x
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)

    def token_loss(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = int(mask.any(0).nonzero().max()) + 1 if mask.any() else ids.shape[1]
        ids, mask = ids[:, :last], mask[:, :last]  # padded rows (classification): the columns no row learns go
        # the decoder's hidden states, then the head and the loss a chunk of positions at a time: the (B, T, V)
        # logits never exist whole
        out = m(input_ids=ids[:, :-1], use_cache=False, output_hidden_states=True, logits_to_keep=1)
        head = getattr(m, "module", m).get_output_embeddings()  # through DDP's wrapper when distributed
        return chunked_next_token_loss(out.hidden_states[-1][:, skip:], head, ids[:, 1:], mask[:, 1:])

    def loss_fn(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor, _idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = token_loss(m, ids, mask)
        return loss, {"loss": float(loss.detach())}

    result = fit(net, train, valid, cfg, settings().home / "runs" / name, loss_fn, resume=resume, token_loss=token_loss)
    ppl = lambda v: math.exp(v) if v is not None else None  # noqa: E731
    run = {"method": method, "lora": lora, "prompt_tuning": prompt, "grad_checkpoint": grad_checkpoint, "data": info, "train": asdict(cfg), "steps": result["steps"],
           "tokens": result["tokens"], "seconds": result["seconds"], "trainable_parameters": trainable,
           "trainable_share": trainable / total_params,
           "validation_perplexity": {"before": ppl(result["val_before"]), "after": ppl(result["val_after"])},
           "loss_curve": [{k: h[k] for k in ("step", "loss", "val_loss") if k in h} for h in result["history"]]}
    if task == "classify":
        run[CLASSIFY_KEY] = {"labels": info["labels"], "prompt_format": prompt_format}
    if method == "full":
        return store.derive(name, with_loss_curve(float_writer(net, tokenizer, name), name, run["loss_curve"]), stage="finetune",
                            parent=model, settings=run, parameters=total_params)

    run["base_files"] = base_card.files
    run["format"] = ("peft prompt-tuning adapter (adapter_config.json + adapter_model.safetensors): virtual tokens the "
                     "engines put before every prompt" if prompt else
                     "peft LoRA adapter (adapter_config.json + adapter_model.safetensors); the base is merged in at load")
    write = lambda staging: _write_adapter(staging, net, tokenizer, name, store.require(model), folder)  # noqa: E731
    return store.derive(name, with_loss_curve(write, name, run["loss_curve"]), stage="finetune", parent=model,
                        settings=run, parameters=total_params)


def merge_stage(adapter: str, *, name: str | None = None, store: Store | None = None) -> ModelCard:
    """Fold a LoRA adapter into its base and install the merged dense model (default ADAPTER-merged)."""
    from slmkit.sources.adapters import base_of, load_merged

    store = store or Store()
    folder = store.require(adapter)
    if not is_adapter(folder):
        raise SlmkitError(f"{adapter} is not a LoRA adapter", "Give a model made by slmkit finetune --method lora.")
    name = validate_name(name or f"{adapter}-merged")
    store.check_free(name)
    base, _ = base_of(folder)
    with progress.step(f"Merging {adapter} into {base}"):
        net, tokenizer = load_merged(folder, dtype=torch.float32)
    return store.derive(name, float_writer(net, tokenizer, name), stage="merge", parent=adapter,
                        settings={"base": base, "adapter": adapter}, parameters=count_params(net))
