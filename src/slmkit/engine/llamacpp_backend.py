"""llama.cpp backend (llama-cpp-python): runs GGUF files with llama.cpp's kernels, sampling with our sampler.

Token ids, chat template (from the GGUF metadata) and log-probabilities follow the same Protocol as the
PyTorch backend, so text streaming, stop strings and limits in `Model` are shared, and greedy output of the
two backends on the same weights can be compared token for token.
"""

from __future__ import annotations

import atexit
import ctypes
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.engine import llamacpp_guard
from slmkit.engine.backend import TokenScores, continuations_by_scoring, scores_from_rows
from slmkit.engine.decode import Step, decode_in_store, decode_loop, tokens_of
from slmkit.engine.sampling import SamplingParams
from slmkit.errors import SlmkitError

SCORING_CONTEXT = 2048


def gguf_of(folder: Path) -> Path:
    """The GGUF file llama.cpp runs for a store folder (the first one), or a clear error saying how to make one."""
    ggufs = sorted(Path(folder).glob("*.gguf"))
    if not ggufs:
        name = Path(folder).name
        raise SlmkitError(f"{name} has no GGUF file for the llama.cpp backend",
                          f"Export one into the store: slmkit export {name} --type Q8_0 --name {name}-q8_0")
    return ggufs[0]


class LlamaCppBackend:
    """One llama.cpp context for generation; a second one with all-position logits is made when scoring."""

    name = "llamacpp"
    prefix: list[int] = []  # no prompt-tuned prefix on llama.cpp (a GGUF holds no virtual tokens)

    def __init__(self, gguf_path: Path, *, threads: int | None = None, n_ctx: int = 0, flash_attn: bool = False) -> None:
        llamacpp_guard.require()  # a build that dies on this CPU must not take the caller's process with it
        self.path = Path(gguf_path)
        self.threads = threads
        self.llm = self._open(n_ctx=n_ctx, logits_all=False, flash_attn=flash_attn)
        self._scorer: Any = None
        self._embedder: Any = None
        self._aux_lock = threading.Lock()  # the scoring and embedding contexts serve one caller at a time
        # llama-cpp-python's own __del__ fails during interpreter teardown: close first (a weak reference, so
        # this registration does not keep a dropped backend and its weights alive)
        ref = weakref.ref(self)
        atexit.register(lambda: (backend := ref()) is not None and backend.close())
        meta = self.llm.metadata
        self._template = meta.get("tokenizer.chat_template")
        arch = meta.get("general.architecture", "")
        self._train_ctx = int(meta.get(f"{arch}.context_length", 0) or self.llm.n_ctx())
        # end of generation as the file declares it (llama.cpp also guesses extra ones from token texts)
        self._eos = frozenset(
            int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta
        )
        self._bos_text = self._piece(self.llm._model.token_bos())
        self._eos_text = self._piece(self.llm._model.token_eos())

    def reset(self) -> None:
        """Forget the cached prefix (speed measurements must not reuse the previous request's KV cache)."""
        self.llm.reset()

    def close(self) -> None:
        for llm in (self.llm, self._scorer, self._embedder):
            if llm is not None:
                llm.close()
        self._scorer = self._embedder = None

    def _open(self, *, n_ctx: int, logits_all: bool, **kw: Any) -> Any:
        from llama_cpp import Llama

        try:
            return Llama(
                model_path=str(self.path), n_ctx=n_ctx, n_threads=self.threads, logits_all=logits_all, verbose=False,
                **{"n_batch": 512, **kw},
            )
        except (ValueError, RuntimeError) as exc:
            raise SlmkitError(f"llama.cpp could not load {self.path}: {exc}", "Check that the GGUF file is complete.") from exc

    @classmethod
    def from_folder(cls, folder: Path, *, threads: int | None = None, n_ctx: int = 0) -> "LlamaCppBackend":
        """The first GGUF of a store folder; `n_ctx` sizes the generation context (0: the model's own)."""
        return cls(gguf_of(folder), threads=threads, n_ctx=n_ctx)

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    @property
    def context_length(self) -> int:
        return min(int(self.llm.n_ctx()), self._train_ctx)

    @property
    def trained_context(self) -> int:
        """The context length the model was trained with (the generation context may be smaller)."""
        return self._train_ctx

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def has_chat_template(self) -> bool:
        return bool(self._template)

    @property
    def vocab_size(self) -> int:
        return int(self.llm.n_vocab())

    def ll_tokenizer(self) -> Any:
        """llguidance's view of the GGUF's vocabulary, for structured output (built once)."""
        if getattr(self, "_ll_tokenizer", None) is None:
            import llama_cpp
            from llguidance.llamacpp import lltokenizer_from_vocab

            vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
            self._ll_tokenizer = lltokenizer_from_vocab(vocab, eos_token=sorted(self.eos_token_ids) or None)
        return self._ll_tokenizer

    def encode(self, text: str, *, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        if not text:
            return self.llm.tokenize(b"", add_bos=add_special_tokens, special=True) if add_special_tokens else []
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=parse_special))

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self._piece(int(token_id))

    @property
    def chat_template(self) -> str | None:
        return self._template or None

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        if not self._template:
            raise SlmkitError(
                "this GGUF has no chat template (tokenizer.chat_template)",
                "Use plain completion instead: slmkit run --raw, or Model.generate().",
            )
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(
            template=self._template, eos_token=self._eos_text, bos_token=self._bos_text,
            add_generation_prompt=add_generation_prompt,
        )
        return formatter(messages=list(messages), tools=list(tools) if tools else None).prompt

    def _last_logits(self) -> torch.Tensor:
        ptr = self.llm._ctx.get_logits_ith(-1)
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab_size,))
        return torch.from_numpy(row.copy())  # (V,)

    def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[int]:
        return tokens_of(self.stream_steps(prompt_ids, params, max_new_tokens))

    def stream_steps(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[Step]:
        """Prefill (reusing the KV of a prefix shared with the previous request: system prompt, chat history), then
        engine/decode.py's loop with llama.cpp's logits."""
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens].tolist()
        keep = 0
        while keep < min(len(cached), len(prompt_ids) - 1) and cached[keep] == prompt_ids[keep]:
            keep += 1
        llm.n_tokens = keep
        llm.eval(list(prompt_ids[keep:]))

        def forward(token: int) -> torch.Tensor:
            llm.eval([token])
            return self._last_logits()

        yield from decode_loop(self._last_logits(), forward, prompt_ids, params, max_new_tokens, self._eos)

    def batch_store(self, slots: int, context: int | None = None) -> Any:
        """A multi-sequence llama.cpp context with `slots` sequences of `context` tokens each, for the scheduler."""
        from slmkit.engine.llamacpp_batch import LlamaCppSlots

        return LlamaCppSlots(self, slots, context)

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int, *, stop_at_eos: bool = True
    ) -> list[list[Step]]:
        """A static batch decoded together in a multi-sequence llama.cpp context (one llama_decode per step).

        Row r samples with seed `params.seed + r`. Finished rows keep computing (static batch) but stop growing.
        """
        from slmkit.engine.llamacpp_batch import LlamaCppSlots

        store = LlamaCppSlots(self, len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        return decode_in_store(store, prompts, params, max_new_tokens, self._eos, stop_at_eos=stop_at_eos)

    def score_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[TokenScores]:
        return scores_from_rows(self.logprob_rows, requests)

    def score_continuations(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        # one evaluation per continuation (llama.cpp's scorer keeps no prefix between calls)
        return continuations_by_scoring(self.score_batch, prefix, continuations)

    def logprob_rows(self, ids: Sequence[int]) -> torch.Tensor:
        with self._aux_lock:
            if self._scorer is None:
                self._scorer = self._open(n_ctx=min(SCORING_CONTEXT, self._train_ctx), logits_all=True)
            if len(ids) > self._scorer.n_ctx():
                raise SlmkitError(f"{len(ids)} tokens exceed the llama.cpp scoring context ({self._scorer.n_ctx()})",
                                  "Use a shorter window (--context-length).")
            self._scorer.reset()
            self._scorer.eval(list(ids))
            logits = torch.from_numpy(np.array(self._scorer.scores[: len(ids) - 1], dtype=np.float32))  # (T-1, V)
        return torch.log_softmax(logits, dim=-1)

    def embed(self, texts: Sequence[str | Sequence[int]]) -> list[list[float]]:
        """Mean-pooled last hidden states (after the final norm, as the PyTorch backend), L2-normalised; text only."""
        import llama_cpp

        if any(not isinstance(t, str) for t in texts):
            raise SlmkitError("token-id inputs to embeddings are served on the PyTorch engine only",
                              "Send text, or serve the model with --backend torch.")
        with self._aux_lock:
            if self._embedder is None:
                n = min(SCORING_CONTEXT, self._train_ctx)
                self._embedder = self._open(n_ctx=n, logits_all=False, embedding=True, n_batch=n, n_ubatch=n,
                                            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
            out = []
            for text in texts:
                ids = self.encode(text, add_special_tokens=True)
                if len(ids) > self._embedder.n_ctx():
                    raise SlmkitError(f"{len(ids)} tokens exceed the llama.cpp embedding context ({self._embedder.n_ctx()})",
                                      "Embed shorter texts.")
                vec = torch.tensor(self._embedder.embed(text), dtype=torch.float32)
                out.append((vec / vec.norm().clamp(min=1e-12)).tolist())
        return out
