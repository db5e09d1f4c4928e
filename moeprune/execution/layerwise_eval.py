"""Evaluation of a model larger than memory: perplexity one decoder layer at a time, generation offloaded.

`LayerwiseBackend` answers the evaluation backend's two requests for a checkpoint folder without loading
the model. `token_nll` (perplexity) reads the weights once per task, whatever the number of texts: the
inputs of every decoder layer are captured for all batches by the model's own forward (as in layer-wise
observation), then each layer is loaded, every batch goes through it, and it is freed; the hidden states
(batches x tokens x hidden) are all that is kept, spilled to disk past a budget. The model's own forward
then turns the last layer's outputs into logits (final norm, head, any logit scaling), with every decoder
layer replaced by a replay of those outputs. Peak memory: one decoder layer, the embedding and the head,
the hidden states, one batch of logits. `generate` (token by token, every row of a batch at once) runs on
`offloaded_model`, built on first use, which reads every streamed layer once per generated token.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.evaluate.backend import HFBackend, rows_nll

__all__ = ["LayerwiseBackend"]


class LayerwiseBackend(HFBackend):
    """The evaluation backend of the checkpoint `src`, never loaded whole.

    dtype: compute dtype ("auto" = the checkpoint's own); max_memory: bytes or "8GB" (half of it bounds the
    hidden states kept in memory and, for generation, what `offloaded_model` keeps resident).
    """

    def __init__(self, src: str | Path, tokenizer, *, device: str | torch.device, dtype: str | torch.dtype = "auto",
                 max_memory: int | str | None = None, batch_size: int = 16, progress: bool = True) -> None:
        from moeprune.checkpoint.model_dir import load_config
        from moeprune.execution.offload import _budget, _resolve_dtype

        self.src, self._device, self.max_memory = Path(src), torch.device(device), _budget(max_memory)
        self.dtype = _resolve_dtype(self.src, dtype)
        self.config = load_config(self.src)
        self._offloaded = None
        super().__init__(None, tokenizer, batch_size=batch_size, progress=progress)

    @property
    def model(self):
        """The offloaded model (for generation and lm-eval); built on first use."""
        if self._offloaded is None:
            from moeprune.execution.offload import offloaded_model

            self._offloaded = offloaded_model(self.src, dtype=self.dtype, device=self._device,
                                              max_memory=self.max_memory)
        return self._offloaded

    @model.setter
    def model(self, value) -> None:  # HFBackend.__init__ hands over None: the model is built on first use
        pass

    @property
    def device(self) -> torch.device:
        return self._device

    def _model_config(self):  # the checkpoint's config: no need to build the offloaded model for it
        return self.config

    @torch.no_grad()
    def token_nll(self, texts: Sequence[str], *, desc: str = "nll") -> list[tuple[float, int]]:
        """As `HFBackend.token_nll`, one decoder layer at a time over every batch of `texts`."""
        batches = list(self._nll_batches(texts))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(texts)
        with self._bar(len(texts), desc) as bar:
            for b, row, logits in self._logits([batch for _, batch in batches]):
                ids, mask = (batches[b][1][k][row:row + 1].to(self.device) for k in ("input_ids", "attention_mask"))
                rows_nll(logits, ids, mask, [batches[b][0][row]], out)
                bar.update(1)
        return out

    def _logits(self, batches: list[dict]):
        """(batch, row, logits of that row (1, T, V)) for every row of every batch, from a layer-by-layer pass
        over all of them; the head runs one row at a time (a batch's logits can be larger than a layer)."""
        from moeprune.execution.layers import HiddenStore, _capture, _move_buffers, _outer_names, _skeleton
        from moeprune.checkpoint.loader import WeightLoader
        from moeprune.checkpoint.names import CheckpointNames
        from moeprune.execution.offload import _aliases, _retie
        from moeprune.checkpoint.safetensors_io import Checkpoint

        model = _skeleton(self.src, self.dtype)
        model.tie_weights()
        names = CheckpointNames(model)
        loader, spec = WeightLoader(Checkpoint(self.src), names), names.adapter.spec
        layers = model.get_submodule(spec.layers)
        _move_buffers(model, self.device)
        pairs = [(b["input_ids"], b["attention_mask"]) for b in batches]
        store = HiddenStore(max_ram_bytes=None if self.max_memory is None else self.max_memory // 2, device=self.device)
        outer = _outer_names(model, spec.layers, loader)
        loaded, aliases = [], _aliases(model, loader)  # tied names, found before loading unties them
        try:
            loader.materialise(model, outer, self.device)
            calls = _capture(model, layers, pairs, self.device, store)
            loader.release(model, outer)  # the embedding is not needed again until the head
            for i, layer in enumerate(layers):
                layer_names = [k for k in model.state_dict(keep_vars=True) if k.startswith(f"{spec.layers}.{i}.")]
                loader.materialise(model, layer_names, self.device)
                for b in range(len(pairs)):
                    args, kwargs = calls[b][i]
                    h = layer(store.get(b), *args, **kwargs)
                    store.put(b, h[0] if isinstance(h, tuple) else h)
                loader.release(model, layer_names)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            loaded = outer + _head_names(model, outer, loader)
            loader.materialise(model, loaded, self.device)
            _retie(model, aliases)  # a tied head shares the embedding just loaded
            missing = [k for k, v in model.state_dict(keep_vars=True).items()
                       if v.device.type == "meta" and not k.startswith(f"{spec.layers}.")]
            if missing:
                raise MoePruneError(f"{self.src}: the checkpoint has no tensor for {missing[:3]}; it does not match "
                                    "its config.json")
            for b, (ids, mask) in enumerate(pairs):
                hidden = store.get(b)
                for row in range(len(ids)):
                    with _replay(layers, hidden[row:row + 1]):
                        yield b, row, model(input_ids=ids[row:row + 1].to(self.device),
                                            attention_mask=mask[row:row + 1].to(self.device), use_cache=False).logits
        finally:
            store.close()
            loader.release(model, loaded)


def _head_names(model, outer: list[str], loader) -> list[str]:
    """The output head's parameters still to load (none when it is tied to the loaded embedding)."""
    head = model.get_output_embeddings()
    if head is None:
        return []
    prefix = next(n for n, m in model.named_modules() if m is head)
    return [k for k in model.state_dict(keep_vars=True) if k.startswith(prefix + ".") and k not in outer
            and k in loader.sources]


class _replay:
    """Every decoder layer replaced for one forward: the first returns `hidden` (the last layer's output for
    this batch), the others pass it on, so the model's own forward computes the head from it."""

    def __init__(self, layers, hidden: torch.Tensor):
        self.layers, self.hidden = layers, hidden

    def __enter__(self):
        hidden = self.hidden

        def first(_self, *args, **kwargs):
            return hidden

        def passthrough(_self, *args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        for i, layer in enumerate(self.layers):
            layer.forward = types.MethodType(first if i == 0 else passthrough, layer)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward
