"""Compressing models whose weights are offloaded by accelerate (`device_map` with `"cpu"`/`"disk"`, `cpu_offload`,
`disk_offload`).

accelerate keeps an offloaded module's tensors on the meta device and attaches an `AlignDevicesHook` that loads them
from its `weights_map` before each forward and drops them after. Calibration runs every sample through a block
twice (statistics, then the next block's inputs), so reloading the block per sample would read it from disk
`2 * num_samples` times. Instead [`onload_block`] brings the whole block to its execution device once, keeps it
there while the block is compressed, then writes the compressed layers back into the hook's weights map (a
safetensors file in the offload folder for disk offload, the CPU state dict otherwise) and offloads the block
again. Only one block is resident at a time: peak memory is one dense block plus the calibration activations.

The compressed model keeps working through the same hooks: forward passes and `save_pretrained` read the new
tensors from the weights map like any other offloaded weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.files import atomic_save_tensors
from .blocks import find_block_stacks, set_module


def _offload_hook(module: nn.Module):
    """The module's accelerate `AlignDevicesHook` if it offloads the module's weights, else None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hooks = hook.hooks if isinstance(hook, SequentialHook) else (hook,)
    for candidate in hooks:
        if isinstance(candidate, AlignDevicesHook) and candidate.offload:
            return candidate
    return None


def has_offloaded_weights(module: nn.Module) -> bool:
    """Whether any submodule of `module` has its weights offloaded by an accelerate hook."""
    return any(_offload_hook(m) is not None for m in module.modules())


def execution_device(model: nn.Module) -> torch.device | None:
    """The device offloaded modules of `model` compute on (None when nothing is offloaded)."""
    for module in model.modules():
        hook = _offload_hook(module)
        if hook is not None and hook.execution_device is not None:
            return torch.device(hook.execution_device)
    return None


class OnloadedBlock:
    """A block whose offloaded weights are resident; [`replace`] swaps a layer and re-offloads it on exit."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.hooks = {name: hook for name, m in block.named_modules() if (hook := _offload_hook(m)) is not None}
        self.modules = {name: block.get_submodule(name) for name in self.hooks}
        self.replaced: dict[str, nn.Module] = {}

    def replace(self, name: str, layer: nn.Module) -> None:
        """Put `layer` at `name` (relative to the block); it is offloaded like the module it replaces on exit."""
        set_module(self.block, name, layer)
        self.replaced[name] = layer

    def _load(self) -> None:
        for name, hook in self.hooks.items():
            module = self.modules[name]
            hook.pre_forward(module)  # loads every offloaded tensor of the module onto the execution device
            hook.offload = False  # ... and keeps it there through the forward passes that follow

    def _release(self) -> None:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        for name, layer in self.replaced.items():
            hook = self.hooks.get(name)
            if hook is None:
                continue
            _store_tensors(hook.weights_map, layer, include_buffers=hook.offload_buffers)
            add_hook_to_module(
                layer,
                AlignDevicesHook(
                    execution_device=hook.execution_device,
                    offload=True,
                    weights_map=hook.weights_map,
                    offload_buffers=hook.offload_buffers,
                    place_submodules=hook.place_submodules,
                    skip_keys=hook.skip_keys,
                ),
            )  # init_hook moves the layer's parameters to the meta device: the memory is freed here
        for name, hook in self.hooks.items():
            hook.offload = True
            # Back to the meta device, replaced modules included: accelerate's forward wrapper makes each module a
            # reference cycle, so a dense layer left loaded would stay in memory until the next garbage collection.
            hook.post_forward(self.modules[name], None)


@contextmanager
def onload_block(block: nn.Module) -> Iterator[OnloadedBlock]:
    """Keep `block`'s offloaded weights on their execution device for the duration; no-op when none are offloaded.

    Layers put in place with `OnloadedBlock.replace` are written to the replaced module's weights map on exit and
    offloaded the same way, so the block leaves with nothing resident but non-offloaded buffers.
    """
    state = OnloadedBlock(block)
    if not state.hooks:
        yield state
        return
    for name in state.hooks:
        hook = state.hooks[name]
        if hook.place_submodules and any(True for _ in block.get_submodule(name).children()):
            raise NotImplementedError(
                f"`{name}` is offloaded as a whole (accelerate `preload_module_classes`); compress with offloading "
                "per layer instead (the default of `device_map` / `cpu_offload` / `disk_offload`)."
            )
    state._load()
    try:
        yield state
    finally:
        state._release()


def _unwrap(weights_map: Mapping) -> tuple[Any, str]:
    """The mapping under accelerate's `PrefixedDataset` wrappers and the full key prefix."""
    prefix = ""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        prefix = weights_map.prefix + prefix  # an outer wrapper's prefix comes after the inner one's
        weights_map = weights_map.dataset
    return weights_map, prefix


def _store_tensors(weights_map: Mapping, layer: nn.Module, include_buffers: bool) -> None:
    """Write `layer`'s tensors under its key prefix into the (possibly lazy, on-disk) weights map."""
    from accelerate.utils import OffloadedWeightsLoader

    base, prefix = _unwrap(weights_map)
    tensors = {name: param.detach() for name, param in layer.named_parameters()}
    if include_buffers:
        tensors.update({name: buf.detach() for name, buf in layer.named_buffers()})
    keys = {prefix + name: tensor for name, tensor in tensors.items()}
    if isinstance(base, OffloadedWeightsLoader):
        for key in keys:
            if key not in base.all_keys:
                base.all_keys.append(key)
        if prefix + "weight" in base.state_dict:  # offloaded to CPU memory: the compressed layer stays there
            for key, tensor in keys.items():
                base.state_dict[key] = tensor.to("cpu", copy=True)
            return
        if base.save_folder is None:
            raise ValueError(
                "The model is offloaded to disk without an offload folder to write the compressed layers to; "
                "load it with `offload_folder=...`."
            )
        path = _write_safetensors(Path(base.save_folder), prefix, keys)
        for key in keys:
            base.index[key] = {"safetensors_file": str(path), "weight_name": key}
    elif isinstance(base, dict):
        for key, tensor in keys.items():
            base[key] = tensor.to("cpu", copy=True)
    else:
        raise TypeError(
            f"Cannot write compressed layers into an accelerate weights map of type {type(base).__name__}; "
            "offload with `device_map`, `cpu_offload` or `disk_offload`."
        )


def _write_safetensors(folder: Path, prefix: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` to `folder/oats-<prefix>safetensors`, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_save_tensors(folder / f"oats-{prefix}safetensors", tensors)


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its first parameter's device, or the execution device if that one is offloaded."""
    device = next(model.parameters()).device
    if device.type == "meta":
        return execution_device(model) or torch.device("cpu")
    return device


def offloading_device_map(source: str, device: str | int = "cpu", offload: str = "disk") -> dict[str, str | int]:
    """A `device_map` for `from_pretrained(source, ...)` that offloads every block and keeps the rest on `device`.

    Embeddings, final norm and head stay on `device` (they run for every calibration sample); each block is
    offloaded to `offload` (`"disk"`, or `"cpu"` when `device` is a GPU) and brought back one at a time while it
    is compressed. Built on a meta-device skeleton, so nothing is loaded.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    stacks = dict(find_block_stacks(skeleton))
    device_map: dict[str, str | int] = {}

    def visit(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if full in stacks:
                device_map.update({f"{full}.{i}": offload for i in range(len(child))})
            elif any(stack.startswith(full + ".") for stack in stacks):
                visit(child, full)
            else:
                device_map[full] = device

    visit(skeleton, "")
    return device_map


def named_resident_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `model` (shared ones once) with its values: a tensor that accelerate keeps on
    the meta device is read from its hook's weights map (one at a time, so memory stays one tensor)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        hook = _offload_hook(module)
        local = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in local:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if tensor.device.type == "meta" and hook is not None:
                try:
                    tensor = hook.weights_map[name]
                except KeyError:
                    pass  # not offloaded by the hook: a skeleton tensor, hashed by its shape
            yield f"{module_name}.{name}" if module_name else name, tensor
