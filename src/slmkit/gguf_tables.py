"""GGUF facts as data tables: pre-tokenizer names, architectures, quant types (no if-ladders on model names)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _gpt2() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


# llama.cpp's tokenizer.ggml.pre name -> the same splitting in `tokenizers`
PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {"gpt-2": _gpt2, "smollm": _smollm}


def _as_json(pre: Any) -> dict[str, Any]:
    """A `tokenizers` pre-tokenizer as the dict tokenizer.json would hold."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    return json.loads(tok.to_str())["pre_tokenizer"]


def _normalized(data: dict[str, Any]) -> str:
    """Drop fields that change offsets only, not how text is split."""

    def clean(d: dict[str, Any]) -> dict[str, Any]:
        d = {k: v for k, v in d.items() if k != "trim_offsets"}
        if "pretokenizers" in d:
            d["pretokenizers"] = [clean(p) for p in d["pretokenizers"]]
        return d

    return json.dumps(clean(data), sort_keys=True)


def pre_name_of(tokenizer_json: dict[str, Any]) -> str | None:
    """The GGUF pre-tokenizer name whose splitting equals this tokenizer.json's, or None."""
    pre = tokenizer_json.get("pre_tokenizer")
    if pre is None:
        return None
    want = _normalized(pre)
    for name, build in PRE_TOKENIZERS.items():
        if _normalized(_as_json(build())) == want:
            return name
    return None


@dataclass(frozen=True)
class GgufArch:
    """How a Hugging Face architecture's weights become llama.cpp's."""

    arch: str  # gguf-py MODEL_ARCH name
    permute: bool = False  # q/k rows reordered into llama.cpp's interleaved rotary pairs (its NEOX-rope archs need none)
    norm_shift: float = 0.0  # added to every RMSNorm weight (Gemma's norms scale by 1 + weight, llama.cpp's by weight)


# Hugging Face architecture -> its GGUF layout (tensor names come from gguf-py's map for the arch)
ARCHITECTURES: dict[str, GgufArch] = {
    "LlamaForCausalLM": GgufArch("LLAMA", permute=True),
    "MistralForCausalLM": GgufArch("LLAMA", permute=True),
    "Qwen2ForCausalLM": GgufArch("QWEN2"),  # q/k/v biases
    "Qwen3ForCausalLM": GgufArch("QWEN3"),  # q/k head norms
    "Phi3ForCausalLM": GgufArch("PHI3"),  # fused qkv and gate_up as they are
    "Gemma3ForCausalLM": GgufArch("GEMMA3", norm_shift=1.0),  # + sliding-window layers and their rope base
}

# slmkit --type name -> llama.cpp file type (llama_ftype). F32/F16 are written directly; the rest are quantized
# from the F32 file by llama.cpp's own quantizer.
GGUF_TYPES: dict[str, str] = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
AUTO_TYPE = "AUTO"  # `export --type auto`: the smallest quantized type within a perplexity budget (export/auto_type.py)
AUTO_CANDIDATES = ("Q4_0", "Q4_1", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_M", "Q6_K", "Q8_0")
DEFAULT_PPL_BUDGET = 0.05  # at most 5% above the float model's perplexity

# chat template family (recognised by markers, all in the Jinja template; the first entry that matches) -> Ollama
# Modelfile TEMPLATE and stops
OLLAMA_TEMPLATES: dict[str, tuple[tuple[str, ...], str, list[str]]] = {
    # Qwen2.5's ChatML with tools (Hermes style): the tools as JSON lines in the system turn, an assistant's calls in
    # <tool_call> tags, tool results in one user turn of <tool_response> blocks (Ollama's .Tools, .ToolCalls, `json`)
    "chatml-tools": (
        ("<|im_start|>", "<tool_call>", "<tools>"),
        '{{- if .Tools }}<|im_start|>system\n{{ if eq (index .Messages 0).Role "system" }}{{ (index .Messages 0).Content }}{{ end }}'
        '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
        'You are provided with function signatures within <tools></tools> XML tags:\n<tools>{{ range .Tools }}\n{{ json . }}{{ end }}'
        '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        '</tool_call><|im_end|>\n'
        '{{ else if eq (index .Messages 0).Role "system" }}<|im_start|>system\n{{ (index .Messages 0).Content }}<|im_end|>\n{{ end }}'
        '{{- $prev := "" }}{{- range $i, $m := .Messages }}'
        '{{- if and (eq $prev "tool") (ne .Role "tool") }}<|im_end|>\n{{ end }}'
        '{{- if and (eq .Role "system") (eq $i 0) }}'
        '{{- else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}\n<tool_response>\n{{ .Content }}\n</tool_response>'
        '{{- else if and (eq .Role "assistant") .ToolCalls }}<|im_start|>assistant{{ if .Content }}\n{{ .Content }}{{ end }}'
        '{{ range .ToolCalls }}\n<tool_call>\n{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}\n</tool_call>'
        '{{ end }}<|im_end|>\n'
        '{{ else }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '{{- $prev = .Role }}{{- end }}'
        '{{- if eq $prev "tool" }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
        ["<|im_end|>", "<|im_start|>"],
    ),
    # Ollama puts the system message (the request's, or the Modelfile's SYSTEM) into .Messages itself: ranging over
    # .Messages alone renders it once, as Ollama's own chatml template does
    "chatml": (
        ("<|im_start|>",),
        '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
        ["<|im_end|>", "<|im_start|>"],
    ),
    "phi3": (  # Phi-3's <|user|> ... <|end|> turns
        ("<|end|>",),
        '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n',
        ["<|end|>", "<|user|>", "<|assistant|>"],
    ),
    "llama3": (  # Llama 3's headers (llama.cpp and Ollama put <|begin_of_text|> first themselves)
        ("<|start_header_id|>",),
        '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
        '<|start_header_id|>assistant<|end_header_id|>\n\n',
        ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    ),
    "gemma": (  # Gemma's <start_of_turn>user / model turns; a system message opens the next turn, as Gemma's own does
        ("<start_of_turn>",),
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- else }}'
        '<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}'
        '<start_of_turn>model\n',
        ["<end_of_turn>", "<start_of_turn>"],
    ),
}
