"""Sequential, block-by-block calibration: find the blocks, capture their inputs, hook their linear layers.

The model is never run end to end after the first capture: each block sees the outputs of the already
compressed blocks before it (as in SparseGPT, Wanda and OATS), and only one block's statistics are alive at
a time.

Works on every model made of stacks of repeated blocks: decoder LMs (one stack), encoders such as BERT,
RoBERTa, DeBERTa-v2 and ViT (one stack), and encoder-decoders such as BART and T5 (two stacks, compressed
encoder first, so the decoder's cross-attention sees the compressed encoder's outputs).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .algorithms import HESSIAN, INPUT_NORMS
from .hessian import HessianAccumulator
from .offload import input_device

logger = logging.getLogger(__name__)

# Linear-like modules the engine refuses rather than skipping silently.
_UNSUPPORTED_PROJECTIONS = ("Conv1D",)
# Which calibration positions count in the statistics while a sample runs through a block (None: all of them).
_TOKEN_MASK: ContextVar[torch.Tensor | None] = ContextVar("oats_token_mask", default=None)

CalibrationBatch = dict[str, torch.Tensor]


class UnsupportedArchitectureError(NotImplementedError):
    """The model's structure is outside what the calibration engine can compress faithfully."""


@dataclass
class SampleCall:
    """The keyword arguments one block received for one calibration batch, and which positions count.

    `token_mask` is the batch's `(batch, seq)` boolean attention mask: padding positions are left out of the
    statistics. It is `None` when the batch has no padding.
    """

    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None = None


@dataclass
class BlockInputs:
    """What the blocks receive: each calibration sample's hidden states at the first block, and the keyword
    arguments the model passes to *each* block.

    `block_kwargs[i]` is either one `dict` shared by every sample (token windows of a decoder LM: the
    arguments do not depend on the sample, so one forward pass records them), or a list of [`SampleCall`], one
    per sample (padded text batches, encoder-decoders whose decoder blocks take the sample's encoder output,
    images). Keyword arguments also differ between blocks in some architectures (Gemma 2/3 sliding layers), so
    they are always recorded per block.
    """

    hidden_states: list[torch.Tensor] = field(default_factory=list)
    block_kwargs: list[dict[str, Any] | list[SampleCall]] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the blocks being captured needs to run."""


def _block_lists(model: nn.Module) -> list[tuple[bool, int, str, nn.ModuleList]]:
    """Every non-empty `nn.ModuleList` of same-class modules: `(class in _no_split_modules, length, name, list)`."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(child).__name__ for child in module}
            if len(classes) == 1:
                candidates.append((classes <= no_split, len(module), name, module))
    if not candidates:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no list of repeated blocks (an `nn.ModuleList` of transformer layers), "
            "so it cannot be compressed block by block. Supported: decoder LMs (Llama, Mistral, Qwen2/3, "
            "Gemma 2/3, Phi-3, OPT), encoders (BERT, RoBERTa, DeBERTa-v2, ViT, DINOv2) and encoder-decoders "
            "(BART, T5)."
        )
    return candidates


def find_block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of repeated blocks, in module order: `[(name, blocks)]`.

    The stacks are the `nn.ModuleList`s whose block class is in `_no_split_modules` (the classes transformers
    never splits across devices), leaving out lists nested in another one: one stack for decoder LMs and
    encoders, two for encoder-decoders (`model.encoder.layers`, `model.decoder.layers`). Models that declare no
    such class fall back to their longest list of same-class modules.
    """
    candidates = _block_lists(model)
    preferred = [(name, blocks) for in_no_split, _, name, blocks in candidates if in_no_split]
    if not preferred:
        _, _, name, blocks = max(candidates, key=lambda c: c[1])
        return [(name, blocks)]
    names = [name for name, _ in preferred]
    return [
        (name, blocks)
        for name, blocks in preferred
        if not any(name != outer and name.startswith(outer + ".") for outer in names)
    ]


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The main stack of repeated blocks (the longest, preferring `_no_split_modules` classes).

    Kept for single-stack callers; [`find_block_stacks`] returns every stack (encoder-decoders have two).
    """
    _, _, name, blocks = max(_block_lists(model), key=lambda c: (c[0], c[1]))
    return name, blocks


# Kept for symmetry with `find_block_stacks`: the name says nothing about decoders any more.
find_blocks = find_decoder_blocks


def find_linear_layers(block: nn.Module, prefix: str, skip: Any = None) -> dict[str, nn.Linear]:
    """All `nn.Linear` modules of a block by full name, refusing projections this engine cannot compress."""
    linears: dict[str, nn.Linear] = {}
    for name, module in block.named_modules():
        full_name = f"{prefix}.{name}" if name else prefix
        if type(module).__name__ in _UNSUPPORTED_PROJECTIONS:
            raise UnsupportedArchitectureError(
                f"`{full_name}` is a {type(module).__name__} (GPT-2 style transposed linear), which is not "
                "supported yet. Supported blocks use `nn.Linear` projections "
                "(Llama, Mistral, Qwen, Gemma, Phi-3, OPT, BERT, DeBERTa-v2, BART, T5, ViT)."
            )
        if isinstance(module, nn.Linear):
            if skip is None or not skip(full_name):
                linears[full_name] = module
        elif not any(True for _ in module.children()):
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() == 3:
                    raise UnsupportedArchitectureError(
                        f"`{full_name}.{param_name}` is a 3-D expert weight (fused mixture-of-experts), which is "
                        "not supported yet; only `nn.Linear` projections are compressed."
                    )
    return linears


# ------------------------------------------------------------------------------------------------ capture
def _bind_block_call(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    """`(hidden_states, every other argument by keyword)` of a block call.

    Some stacks pass extra arguments positionally (T5's mask and position bias, DeBERTa's mask), so the call is
    bound to the block's signature rather than read from `kwargs` alone.
    """
    try:
        bound = inspect.signature(block.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):  # no usable signature: only keyword arguments can be replayed
        if len(args) > 1:
            raise UnsupportedArchitectureError(
                f"{type(block).__name__} is called with {len(args)} positional arguments that cannot be matched "
                "to its signature, so its calls cannot be replayed."
            ) from None
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}
    names = list(bound.signature.parameters)
    arguments = dict(bound.arguments)
    hidden = arguments.pop(names[0])
    rest: dict[str, Any] = {}
    for name, value in arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            rest.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise UnsupportedArchitectureError(
                    f"{type(block).__name__} takes extra positional arguments (*{name}), which cannot be replayed."
                )
        else:
            rest[name] = value
    return hidden, rest


def _output_hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _record_forward(
    model: nn.Module, blocks: nn.ModuleList, model_inputs: dict[str, Any], *, stop: bool, check_chain: bool
) -> tuple[torch.Tensor, list[dict[str, Any] | None]]:
    """Run `model(**model_inputs)`, recording the first block's hidden states and every block's arguments.

    With `stop`, the forward ends at the last block's call (nothing after the stack runs). With `check_chain`,
    each block's output is compared with the next block's input: a stack that transforms the hidden states
    between blocks (DeBERTa-v2's convolution after layer 0 when `conv_kernel_size > 0`) cannot be replayed
    block by block and is refused.
    """
    recorded: list[dict[str, Any] | None] = [None] * len(blocks)
    # Only the first block's input and the latest block output are kept, so checking costs one activation.
    state: dict[str, Any] = {"first": None, "previous": None, "broken": None}
    last = len(blocks) - 1

    def pre_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, recorded[index] = _bind_block_call(module, args, kwargs)
            if index == 0:
                state["first"] = hidden.detach()
            elif check_chain and state["broken"] is None:
                # Device hooks may have moved the input: compare values, not placement. nan_to_num: NaN
                # activations (a broken model) are reported later as such, not as a transform.
                previous = state["previous"].to(hidden.device).nan_to_num()
                if not torch.equal(previous, hidden.detach().nan_to_num()):
                    state["broken"] = index - 1
            state["previous"] = None
            if stop and index == last:
                raise _StopForward

        return hook

    def post_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        state["previous"] = _output_hidden(output).detach()

    handles = [block.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    if check_chain:
        handles += [block.register_forward_hook(post_hook) for i, block in enumerate(blocks) if i < last]
    try:
        model(**model_inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if any(kwargs is None for kwargs in recorded):
        raise UnsupportedArchitectureError(
            f"Not every block of {type(model).__name__} was reached by the forward pass; "
            "the block structure is not the one this engine expects."
        )
    if state["broken"] is not None:
        index = state["broken"]
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} changes the hidden states between block {index} and block {index + 1} "
            "(for example DeBERTa-v2's convolution after the first layer, `conv_kernel_size > 0`), so its blocks "
            "cannot be compressed one by one."
        )
    return state["first"], recorded


def model_inputs_for(model: nn.Module, batch: CalibrationBatch) -> dict[str, Any]:
    """The keyword arguments of `model.forward` for one calibration batch, on the model's device.

    Keeps only the inputs `forward` names (tokenizers also return `token_type_ids`, which BART does not take),
    turns off the KV cache, and gives encoder-decoders a teacher-forcing decoder input (`input_ids` shifted
    right by one, with the same attention mask), so both stacks see the calibration text.
    """
    device = input_device(model)
    parameters = inspect.signature(model.forward).parameters
    # A forward that only declares **kwargs still gets the main inputs.
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    main = ("input_ids", "attention_mask", "pixel_values")
    inputs: dict[str, Any] = {
        k: v.to(device) for k, v in batch.items() if k in parameters or (open_kwargs and k in main)
    }
    if "input_ids" not in inputs and "pixel_values" not in inputs:
        raise ValueError(f"{type(model).__name__}.forward takes none of the calibration inputs {sorted(batch)}.")
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and "input_ids" in inputs and "decoder_input_ids" in parameters:
        if "decoder_input_ids" not in inputs:
            input_ids = inputs["input_ids"]
            start = config.decoder_start_token_id
            if start is None:
                start = config.pad_token_id if config.pad_token_id is not None else 0
            inputs["decoder_input_ids"] = torch.cat([torch.full_like(input_ids[:, :1], start), input_ids[:, :-1]], 1)
            if "attention_mask" in inputs and "decoder_attention_mask" in parameters:
                inputs["decoder_attention_mask"] = inputs["attention_mask"]
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    return inputs


def _token_mask(batch: CalibrationBatch, device: torch.device) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or bool(mask.all()):
        return None
    return mask.to(device=device, dtype=torch.bool)


def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    inputs: torch.Tensor | list[CalibrationBatch],
    progress: bool = False,
) -> BlockInputs:
    """Record the first block's input for every calibration sample, and every block's keyword arguments.

    Args:
        inputs: either `(num_samples, seqlen)` token ids (decoder LMs: every sample shares the blocks' keyword
            arguments, so samples stop at the first block and one full forward records the arguments), or a list
            of model-ready batches (`input_ids` + `attention_mask` [+ `token_type_ids`], or `pixel_values`), each
            run through the model up to the stack's last block to record its own arguments and padding mask.
    """
    from tqdm.auto import tqdm

    config = getattr(model, "config", None)
    if isinstance(inputs, torch.Tensor) and not getattr(config, "is_encoder_decoder", False):
        return _capture_shared(model, blocks, inputs, progress)
    if isinstance(inputs, torch.Tensor):
        inputs = [{"input_ids": row[None]} for row in inputs]
    device = input_device(model)
    captured = BlockInputs(block_kwargs=[[] for _ in blocks])
    for index, batch in enumerate(tqdm(inputs, desc="Capturing block inputs", disable=not progress, leave=False)):
        hidden, recorded = _record_forward(
            model, blocks, model_inputs_for(model, batch), stop=True, check_chain=index == 0
        )
        captured.hidden_states.append(hidden)
        mask = _token_mask(batch, hidden.device if hidden is not None else device)
        for calls, kwargs in zip(captured.block_kwargs, recorded, strict=True):
            calls.append(SampleCall(kwargs, mask))
    return captured


def _capture_shared(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, progress: bool) -> BlockInputs:
    from tqdm.auto import tqdm

    captured = BlockInputs()
    _, captured.block_kwargs = _record_forward(
        model, blocks, model_inputs_for(model, {"input_ids": input_ids[:1]}), stop=False, check_chain=True
    )

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.hidden_states.append(_bind_block_call(module, args, kwargs)[0].detach())
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for sample in tqdm(input_ids, desc="Capturing block inputs", disable=not progress, leave=False):
            try:
                model(**model_inputs_for(model, {"input_ids": sample.unsqueeze(0)}))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def inputs_digest_tensor(inputs: torch.Tensor | list[CalibrationBatch]) -> torch.Tensor:
    """One tensor standing for all calibration inputs (what a resume fingerprint hashes)."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    return torch.cat([batch[key].detach().cpu().flatten().double() for batch in inputs for key in sorted(batch)])


def block_forward(
    block: nn.Module, hidden_states: list[torch.Tensor], kwargs: dict[str, Any] | list[SampleCall]
) -> list[torch.Tensor]:
    """Run every sample through one block with that block's keyword arguments; returns the outputs.

    `kwargs` is one dict for all samples or one [`SampleCall`] per sample (see [`BlockInputs`]); a sample's
    padding mask is in force while it runs, so [`collect_statistics`] leaves its padding positions out.
    """
    calls = kwargs if isinstance(kwargs, list) else [SampleCall(kwargs)] * len(hidden_states)
    if len(calls) != len(hidden_states):
        raise ValueError(f"{len(hidden_states)} calibration samples but {len(calls)} recorded block calls.")
    outputs = []
    for hidden, call in zip(hidden_states, calls, strict=True):
        token = _TOKEN_MASK.set(call.token_mask)
        try:
            out = block(hidden, **call.kwargs)
        finally:
            _TOKEN_MASK.reset(token)
        outputs.append(_output_hidden(out).detach())
    return outputs


# ------------------------------------------------------------------------------------------------ statistics
class InputNormAccumulator:
    """Accumulates `sum_t x_tj^2` per input feature; `finalize()` gives `||X_j||_2` (Wanda/OATS's D)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum_squares += flat.square().sum(dim=0).double()
        self.tokens += flat.shape[0]

    def finalize(self) -> torch.Tensor:
        return self.sum_squares.sqrt().float()


STATISTICS = {INPUT_NORMS: InputNormAccumulator, HESSIAN: HessianAccumulator}


def counted_positions(x: torch.Tensor) -> torch.Tensor:
    """The rows of a linear layer's input `x (..., d_in)` that count: padding positions of the running sample
    are dropped.

    The mask applies when `x` is laid out `(batch, seq, d_in)` like the sample; inputs of another shape (DeBERTa's
    relative-position embeddings, which its attention projects with the same `query_proj`/`key_proj`) are not
    per-token and count in full.
    """
    mask = _TOKEN_MASK.get()
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@contextmanager
def collect_statistics(linears: dict[str, nn.Linear], needed: tuple[str, ...]) -> Iterator[dict[str, dict]]:
    """Hook `linears` while the block runs; yields `{layer: {statistic: accumulator}}`.

    Padding positions (where the running sample's attention mask is 0) are not counted.
    """
    accumulators: dict[str, dict] = {
        name: {stat: STATISTICS[stat](layer.in_features, layer.weight.device) for stat in needed}
        for name, layer in linears.items()
    }
    handles = []
    for name, layer in linears.items():
        if not needed:
            continue

        def hook(_module: nn.Module, args: tuple, _output: Any, name: str = name) -> None:
            x = counted_positions(args[0])
            for accumulator in accumulators[name].values():
                accumulator.update(x)

        handles.append(layer.register_forward_hook(hook))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
