"""A model whose blocks' weights stay in the checkpoint until a block runs: load a model that does not fit.

The model is built as usual, except that every block's parameters are placeholders on the meta device; the
embeddings, the final norm and the output head (and every buffer) are real. A forward pre-hook on each block
brings its tensors in just before it runs, read from the safetensors shards at the offsets their headers
give (read, not memory-mapped: a mapped page counts as resident for as long as the file is open, which would
make a streamed 8B as resident as a loaded one) and converted to the run's dtype and device, and blocks beyond a small byte budget
are dropped again, oldest first. Because the modules, the hooks' order and the weights are those of the
in-memory model, every path that runs the model (the game and its prefix sharing, held-out perplexity, the
one-pass traces of shortgpt and angular) runs unchanged and gives the same numbers bit for bit on a CPU
(tests/models/test_stream.py); only where the weights wait differs.

`offload="cpu"` keeps every block's converted tensors in host memory after their first read (pinned when
the device is a GPU), so each block crosses the bus, not the disk, per use; `"disk"` rereads them from the
page cache or the disk every time and so needs host memory for the resident blocks only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layershap.errors import LayershapError
from layershap.models.architectures import architecture_for_type
from layershap.models.checkpoint import CheckpointIndex, checkpoint_index, read_tensor

# The attribute a streamed model carries: its `BlockStreamer` (game/context.py fingerprints through it,
# models/stream_save.py copies tensors by it).
STREAMER_ATTR = "layershap_streamer"
# Blocks kept resident by default: the one running. More would not help: a pass over several window batches
# cycles through every block, and the sweep (game/sweep.py) needs each block once per chunk of masks.
DEFAULT_RESIDENT_BLOCKS = 1


@dataclass
class _Slot:
    """One parameter of a block: where it lives in the module tree and in the checkpoint."""

    module: torch.nn.Module
    attr: str
    name: str
    placeholder: torch.nn.Parameter


@dataclass
class _Block:
    index: int
    module: torch.nn.Module
    slots: list[_Slot]
    nbytes: int
    loaded: bool = False


@dataclass
class BlockStreamer:
    """Brings blocks' weights in on demand and lets them go beyond `resident_bytes`.

    loads counts block loads (the tests and benchmarks read it); host_cache holds the converted tensors when
    offloading to host memory.
    """

    index: CheckpointIndex
    prefix: str
    dtype: torch.dtype
    device: torch.device
    resident_bytes: int
    offload: str = "disk"
    blocks: list[_Block] = field(default_factory=list)
    loads: int = 0
    paused: bool = False
    _resident: OrderedDict = field(default_factory=OrderedDict)
    _handles: dict = field(default_factory=dict)
    host_cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def read(self, name: str) -> torch.Tensor:
        """A checkpoint tensor on the host, converted to the run's dtype (floating tensors only)."""
        cached = self.host_cache.get(name)
        if cached is not None:
            return cached
        entry = self.index.tensors.get(name)
        if entry is None:
            raise LayershapError(f"the checkpoint in {self.index.directory} has no tensor {name}")
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = open(entry.file, "rb")  # noqa: SIM115 - open for the run
        tensor = read_tensor(handle, entry)
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        if self.offload == "cpu":
            if self.device.type == "cuda":
                tensor = tensor.pin_memory()
            self.host_cache[name] = tensor
        return tensor

    def ensure(self, position: int) -> None:
        """Make block `position` (its index in the checkpoint) resident, evicting the oldest others (nothing
        while `paused`: `game/sweep.py` records the blocks' arguments without running them)."""
        if self.paused:
            return
        block = self.blocks[position]
        if block.loaded:
            self._resident.move_to_end(position)
            return
        while self._resident and sum(self.blocks[i].nbytes for i in self._resident) + block.nbytes > \
                self.resident_bytes:
            oldest, _ = self._resident.popitem(last=False)
            self._evict(self.blocks[oldest])
        for slot in block.slots:
            tensor = self.read(slot.name).to(self.device, non_blocking=True)
            slot.module._parameters[slot.attr] = torch.nn.Parameter(tensor, requires_grad=False)
        block.loaded = True
        self._resident[position] = None
        self.loads += 1

    def release_all(self) -> None:
        """Drop every resident block (a benchmark's clean start; the next run loads again)."""
        while self._resident:
            oldest, _ = self._resident.popitem(last=False)
            self._evict(self.blocks[oldest])

    def source_of(self, tensor: torch.Tensor) -> str | None:
        """The checkpoint name of a block's placeholder (a meta tensor of this model), else None."""
        if not tensor.is_meta:
            return None
        if not hasattr(self, "_names"):
            self._names = {id(s.placeholder): s.name for b in self.blocks for s in b.slots}
        return self._names.get(id(tensor))

    def positions_of(self, modules) -> list[int]:
        """The checkpoint positions of these blocks (the model's block list after pruning)."""
        where = {id(b.module): b.index for b in self.blocks}
        return [where[id(module)] for module in modules]

    def block_tensor_names(self, position: int) -> list[str]:
        return [slot.name for slot in self.blocks[position].slots]

    @staticmethod
    def _evict(block: _Block) -> None:
        for slot in block.slots:
            slot.module._parameters[slot.attr] = slot.placeholder
        block.loaded = False


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real (rotary frequencies
    are computed when a module is built): each parameter is allocated uninitialised, then replaced."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def load_streamed(directory: Path | str, *, dtype: torch.dtype, device: torch.device, offload: str = "disk",
                  resident_bytes: int | None = None, config=None, trust_remote_code: bool = False):
    """The model of a safetensors checkpoint directory with its blocks streamed (see the module's doc).

    resident_bytes: how many bytes of blocks may stay loaded at once (default: `DEFAULT_RESIDENT_BLOCKS`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    index = checkpoint_index(directory)
    if config is None:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    arch = architecture_for_type(config.model_type)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    prefix = arch.blocks
    blocks = _module_at(model, prefix)
    streamer = BlockStreamer(index, prefix, dtype, device, 0, offload)
    _load_outside_blocks(model, streamer, prefix, device)
    for position, block in enumerate(blocks):
        slots = []
        for name, module in block.named_modules():
            for attr, param in module._parameters.items():
                if param is None:
                    continue
                full = f"{prefix}.{position}.{name + '.' if name else ''}{attr}"
                if full not in index.tensors:
                    raise LayershapError(f"the checkpoint in {directory} has no tensor {full}; it cannot be "
                                         "streamed (load it with --offload none)")
                slots.append(_Slot(module, attr, full, param))
        nbytes = sum(s.placeholder.numel() * s.placeholder.element_size() for s in slots)
        streamer.blocks.append(_Block(position, block, slots, nbytes))
        block.register_forward_pre_hook(lambda module, args, position=position: streamer.ensure(position),
                                        prepend=True)
    largest = max((b.nbytes for b in streamer.blocks), default=0)
    streamer.resident_bytes = resident_bytes if resident_bytes is not None else DEFAULT_RESIDENT_BLOCKS * largest
    setattr(model, STREAMER_ATTR, streamer)
    return model


def streamer_of(model) -> BlockStreamer | None:
    return getattr(model, STREAMER_ATTR, None)


def block_bytes(model) -> int:
    """Bytes of the largest block of a streamed model in its run dtype."""
    streamer = streamer_of(model)
    return max((b.nbytes for b in streamer.blocks), default=0) if streamer else 0


def _load_outside_blocks(model, streamer: BlockStreamer, prefix: str, device: torch.device) -> None:
    """Load every parameter outside the blocks for good; tied parameters (one object under two names) are
    loaded once from whichever name the checkpoint holds and put back under every name."""
    owners: dict[int, list[tuple[torch.nn.Module, str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if module_name == prefix or module_name.startswith(prefix + "."):
            continue
        for attr, param in module._parameters.items():
            if param is not None:
                full = f"{module_name + '.' if module_name else ''}{attr}"
                owners.setdefault(id(param), []).append((module, attr, full))
    for holders in owners.values():
        stored = [full for _, _, full in holders if full in streamer.index.tensors]
        if not stored:
            raise LayershapError(f"the checkpoint in {streamer.index.directory} has no tensor "
                                 f"{holders[0][2]}; it cannot be streamed (load it with --offload none)")
        tensor = streamer.read(stored[0]).to(device)
        streamer.host_cache.pop(stored[0], None)
        param = torch.nn.Parameter(tensor, requires_grad=False)
        for module, attr, _ in holders:
            module._parameters[attr] = param


def _module_at(model, dotted: str) -> torch.nn.ModuleList:
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def check_streamed(model, *, granularity: str = "block", quantize: str | None = None,
                   repair: str = "none") -> None:
    """Refuse, before any work, what a streamed model cannot do: quantizing (torchao needs the weights),
    saving with single sublayers removed (layershap's modeling file is written from the loaded model), and a
    repair (folded into weights that the streamed save copies from the source shards unchanged)."""
    if streamer_of(model) is None:
        return
    if repair != "none":
        raise LayershapError("--repair folds into weights that a streamed model copies from its shards unchanged; "
                             "pass --repair none, or --offload none (with --dtype bfloat16 if it does not fit)")
    if quantize is not None:
        raise LayershapError("--quantize needs the model loaded whole, and this one is streamed; prune first, "
                             "then `layershap quantize` the pruned model (smaller), or pass --offload none")
    if granularity == "sublayer":
        raise LayershapError("--granularity sublayer needs the model loaded whole, and this one is streamed; "
                             "pass --offload none (with --dtype bfloat16 if it does not fit)")
