"""llama.cpp (through llama-cpp-python, an optional extra) as an engine for GGUF deployments.

llama.cpp keeps the KV cache inside its context, so the session follows the internal-cache contract of the decode
loop: the masks and positions the loop builds are not needed (llama.cpp places each token after the ones it holds),
`init_past` clears the context, and a step feeds only the new token ids. Unlike DeepSparse's internal cache, a
cleared context is a defined empty cache, so whole windows can be scored for perplexity. Threads = --cores.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from ..errors import UserError

LLAMACPP_MISSING = ("llama-cpp-python is not installed; `pip install 'dlp-deploy[llamacpp]'` or "
                    "`bash scripts/llamacpp-wheel.sh PYTHON` (builds llama.cpp for this CPU, ~5 min on 2 cores)")


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llamacpp_module():
    if not llamacpp_available():
        raise UserError(LLAMACPP_MISSING)
    import llama_cpp

    return llama_cpp


def llamacpp_build_info() -> dict:
    llama_cpp = llamacpp_module()
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


class LlamaCppSession:
    name = "llamacpp"
    internal_cache = True
    scores_windows = True  # a cleared context is an empty cache: fresh windows can be scored

    def __init__(self, gguf_path, seq_len: int, num_cores: int | None = None, batch: int = 1,
                 all_logits: bool = True):
        if batch != 1:
            raise UserError(f"--batch {batch}: the llama.cpp engine runs one sequence at a time; use --batch 1")
        llama_cpp = llamacpp_module()
        self.seq_len, self.batch = seq_len, batch
        self.n_batch = min(512, seq_len)
        # llama-cpp-python's default is half the cores; the other engines use all usable ones unless told
        num_cores = num_cores or len(os.sched_getaffinity(0))
        # every prompt position's logits (validation and perplexity need them) cost 0.75 ms a decode step on
        # SmolLM2 in llama-cpp-python's bookkeeping; a benchmark asks for the last position only, as llama.cpp
        # users run it
        self.all_logits = all_logits
        self._llama_cpp = llama_cpp
        self._llm = llama_cpp.Llama(str(gguf_path), n_ctx=seq_len, n_batch=self.n_batch, n_ubatch=self.n_batch,
                                    n_threads=num_cores, n_threads_batch=num_cores, logits_all=all_logits,
                                    verbose=False, use_mmap=True)
        self._vocab = int(self._llm.n_vocab())
        self.threads = int(self._llm.context_params.n_threads)

    def prepare(self, length: int) -> None:
        if not 1 <= length < self.seq_len:
            raise UserError(f"cannot run {length} tokens at once in a {self.seq_len}-token window; "
                            "use a shorter prompt or a larger --seq-len")

    def window(self, filled: int, length: int) -> int:
        return filled + length

    def init_past(self, length: int) -> list:
        self._llm.reset()  # the next eval drops every cached slot from position 0 on
        return []

    def advance(self, present, next_length: int) -> list:
        return []

    def run(self, input_ids, attention_mask, positions, causal_mask, past_kv):
        tokens = [int(t) for t in np.asarray(input_ids)[0]]
        start = self._llm.n_tokens
        self._llm.eval(tokens)
        if self.all_logits:
            return np.array(self._llm.scores[start:start + len(tokens)], dtype=np.float32)[None], []
        last = self._llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(last, shape=(self._vocab,)).copy()[None, None], []

    def kernel_report(self) -> dict:
        return {"sparse_kernel_used": False, "threads": self.threads, "n_batch": self.n_batch,
                **llamacpp_build_info()}

