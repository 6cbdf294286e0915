"""LoRA adapters of one base model, applied per row: rows of the same batch may each use
another adapter, or none.

Each targeted linear layer keeps every loaded adapter's matrices in slots and adds, for
each row, ``B_i A_i x`` for the row's slot ``i`` (slot 0: no adapter). Which slot each
row uses is a tensor the engine sets before each forward pass, so a step's shapes do
not depend on which adapters its rows use (a CUDA graph stays valid). Adapter scales
are folded into ``B`` when loaded.

Adapters are read from PEFT's format (``adapter_config.json`` and
``adapter_model.safetensors``): plain LoRA on linear layers. Anything else (DoRA, biases,
modules to save, per-layer ranks) is refused with the reason.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

logger = logging.getLogger("ray.serve")

# PEFT's keys: base_model.model.<module path>.lora_A.weight
_KEY_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What an adapter's ``adapter_config.json`` says that the engine needs."""

    rank: int
    scale: float
    target_modules: frozenset[str]  # module names as PEFT matches them (last name part)

    @classmethod
    def read(cls, folder: Path) -> AdapterConfig:
        """Raises ValueError naming what this engine cannot apply."""
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: no readable adapter_config.json ({exc})") from None
        refused = {
            "peft_type": config.get("peft_type") != "LORA",
            "use_dora": bool(config.get("use_dora")),
            "bias": config.get("bias", "none") != "none",
            "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
            "modules_to_save": bool(config.get("modules_to_save")),
            "rank_pattern": bool(config.get("rank_pattern")),
            "alpha_pattern": bool(config.get("alpha_pattern")),
            "layers_to_transform": config.get("layers_to_transform") is not None,
        }
        if any(refused.values()):
            fields = ", ".join(name for name, bad in refused.items() if bad)
            raise ValueError(f"{folder}: only plain LoRA on linear layers is supported; this adapter sets {fields}")
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
        targets = config.get("target_modules") or []
        if isinstance(targets, str):
            raise ValueError(f"{folder}: target_modules as a pattern is not supported; list the module names")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return cls(rank=rank, scale=scale, target_modules=frozenset(targets))


class RowAdapters:
    """Which adapter slot each row of the next forward pass uses (set by the engine),
    as the column mask every LoRA layer applies: row r keeps the ``rank`` columns of its
    slot's block of ``A x`` (slot 0, no adapter: none)."""

    def __init__(self, slots: int, rank: int, device: torch.device, dtype: torch.dtype) -> None:
        self._dtype = dtype
        self._column_slot = torch.arange(slots * rank, device=device) // rank + 1  # the slot of each column
        self.mask: torch.Tensor | None = None  # [rows, 1, slots x rank]; None: no row uses an adapter

    def use(self, index: torch.Tensor | None) -> None:
        """``index`` [rows]: each row's slot; None when every row is the base model's.
        Tensor operations only: the slot decoder calls it inside its CUDA graphs."""
        self.mask = None if index is None else (index[:, None, None] == self._column_slot).to(self._dtype)


class BatchedLoraLinear(torch.nn.Module):
    """A linear layer plus, per row, the LoRA delta of that row's adapter slot.

    Every slot's ``A`` is one block of rows of ``lora_a`` [slots x rank, in], its ``B``
    one block of columns of ``lora_b`` [out, slots x rank]: ``A x`` is computed for all
    slots at once, the row's mask keeps its own slot's columns, and ``B`` maps them
    back. Two matmuls and a multiply per layer whatever the mix of adapters (on 2 CPU
    cores it did better than per-row gathers of ``A`` and ``B`` with batched matmuls,
    punica's layout, in bench/adapters.py; that run was not kept). Its work grows with
    slots x rank, which max_adapters bounds; with many large adapters on a GPU, a
    segmented kernel (punica, vLLM's) would do less.
    """

    def __init__(self, base: torch.nn.Linear, slots: int, rank: int, rows: RowAdapters) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        weight = base.weight
        self.lora_a = torch.nn.Parameter(
            torch.zeros(slots * rank, base.in_features, dtype=weight.dtype, device=weight.device), requires_grad=False
        )
        self.lora_b = torch.nn.Parameter(
            torch.zeros(base.out_features, slots * rank, dtype=weight.dtype, device=weight.device), requires_grad=False
        )
        self._rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        mask = self._rows.mask
        if mask is None:
            return output
        down = torch.nn.functional.linear(x, self.lora_a) * mask  # [rows, tokens, slots x rank]
        # In place, one op: the base layer's output is a tensor of its own.
        output.view(-1, output.shape[-1]).addmm_(down.view(-1, down.shape[-1]), self.lora_b.t())
        return output

    def put(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Writes an adapter's ``a`` [rank, in] and ``b`` [out, rank] (already scaled)
        into ``slot`` (1-based); None clears it."""
        block = slice((slot - 1) * self.rank, slot * self.rank)
        self.lora_a[block] = 0
        self.lora_b[:, block] = 0
        if a is not None:
            rank = a.shape[0]
            self.lora_a[block.start : block.start + rank] = a.to(self.lora_a.dtype)
            self.lora_b[:, block.start : block.start + rank] = b.to(self.lora_b.dtype)


class Adapters:
    """The adapters a model serves: their configs read at start, their weights loaded
    into slots on first use, the least recently used idle one replaced when all ``slots``
    are taken (never one a running row uses). The slots are allocated once: memory for
    ``slots`` adapters of the largest rank, however many the config names.

    Args:
        model: the base model (its targeted linear layers are wrapped in place).
        folders: adapter name -> local folder in PEFT's format.
        slots: adapters held at once.
    """

    def __init__(self, model: torch.nn.Module, folders: dict[str, Path], slots: int) -> None:
        self._folders = dict(folders)
        self._configs = {name: AdapterConfig.read(folder) for name, folder in self._folders.items()}
        self.slots = slots
        rank = max(config.rank for config in self._configs.values())
        weight = next(model.parameters())
        self.rows = RowAdapters(slots, rank, weight.device, weight.dtype)
        targets = frozenset().union(*(config.target_modules for config in self._configs.values()))
        self._layers: dict[str, BatchedLoraLinear] = {}
        for path, module in list(model.named_modules()):
            for name, child in list(module.named_children()):
                if name in targets and isinstance(child, torch.nn.Linear):
                    wrapped = BatchedLoraLinear(child, slots, rank, self.rows)
                    setattr(module, name, wrapped)
                    self._layers[f"{path}.{name}" if path else name] = wrapped
        if not self._layers:
            raise ValueError(f"no linear layer of the model is named in the adapters' target_modules: {sorted(targets)}")
        # name -> slot, least recently used first; only the scheduler thread changes it.
        self._loaded: collections.OrderedDict[str, int] = collections.OrderedDict()

    @property
    def names(self) -> list[str]:
        return list(self._folders)

    @property
    def loaded(self) -> list[str]:
        """Adapters held now, least recently used first."""
        return list(self._loaded)

    def slot_for(self, name: str, in_use: set[str]) -> int | None:
        """The slot holding adapter ``name``, loaded into a free slot (or the least
        recently used one whose adapter no row in ``in_use`` needs) if it is not held;
        None when every slot holds an adapter in use (the request must wait)."""
        slot = self._loaded.get(name)
        if slot is None:
            free = self._free_slot(in_use)
            if free is None:
                return None
            slot, replaced = free
            self._load(name, slot)
            self._loaded[name] = slot
            logger.info("adapter %s loaded into slot %d%s", name, slot, f", replacing {replaced}" if replaced else "")
        self._loaded.move_to_end(name)
        return slot

    def _free_slot(self, in_use: set[str]) -> tuple[int, str | None] | None:
        """A slot for another adapter, and the adapter it held (None if it was free)."""
        taken = set(self._loaded.values())
        for slot in range(1, self.slots + 1):
            if slot not in taken:
                return slot, None
        for name, slot in self._loaded.items():  # least recently used first
            if name not in in_use:
                del self._loaded[name]  # its slot is overwritten by the next adapter
                return slot, name
        return None

    def _load(self, name: str, slot: int) -> None:
        config = self._configs[name]
        weights = load_file(str(self._folders[name] / "adapter_model.safetensors"))
        pairs: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
        for key, tensor in weights.items():
            path, _, kind = key.removeprefix(_KEY_PREFIX).rpartition(".lora_")
            pairs[path][kind.removesuffix(".weight")] = tensor
        unknown = set(pairs) - set(self._layers)
        if unknown:
            raise ValueError(f"adapter {name} has weights for layers this model lacks: {sorted(unknown)[:3]}")
        for path, layer in self._layers.items():
            pair = pairs.get(path)
            if pair is None:
                layer.put(slot, None, None)
            else:
                layer.put(slot, pair["A"], pair["B"] * config.scale)
