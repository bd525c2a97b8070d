"""Sequential, block-by-block calibration: capture what the blocks receive, and replay it one block at a time.

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks import UnsupportedArchitectureError
from .offload import input_device
from .statistics import counting_positions

logger = logging.getLogger(__name__)

CalibrationBatch = dict[str, torch.Tensor]


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
    calls = sample_calls(kwargs, len(hidden_states))
    return [replay_sample(block, hidden, call).detach() for hidden, call in zip(hidden_states, calls, strict=True)]


def sample_calls(kwargs: dict[str, Any] | list[SampleCall], num_samples: int) -> list[SampleCall]:
    """One [`SampleCall`] per sample, from a block's recorded keyword arguments."""
    calls = kwargs if isinstance(kwargs, list) else [SampleCall(kwargs)] * num_samples
    if len(calls) != num_samples:
        raise ValueError(f"{num_samples} calibration samples but {len(calls)} recorded block calls.")
    return calls


def replay_sample(block: nn.Module, hidden: torch.Tensor, call: SampleCall) -> torch.Tensor:
    """One sample through one block, as the model called it (differentiable when autograd is on)."""
    with counting_positions(call.token_mask):
        return _output_hidden(block(hidden, **call.kwargs))
