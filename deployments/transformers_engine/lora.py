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
from safetensors import safe_open
from safetensors.torch import load_file

from deployments.protocol import AdapterLoadError

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
        for name in self._folders:  # at start: a replica with a bad adapter never serves
            with safe_open(str(self._weights_file(name)), "pt") as weights:
                self._pairs(name, {key: weights.get_slice(key).get_shape() for key in weights.keys()})
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
        None when every slot holds an adapter in use (the request must wait).

        Raises:
            AdapterLoadError: its weights could not be read, or do not fit the model;
                every slot is then as it was (the adapter that would have been replaced
                still serves).
        """
        slot = self._loaded.get(name)
        if slot is None:
            free = self._free_slot(in_use)
            if free is None:
                return None
            slot, replaced = free
            try:
                pairs = self._read(name)
            except Exception as exc:  # noqa: BLE001 - whatever failed, only this adapter's requests fail
                raise AdapterLoadError(name, str(exc) or type(exc).__name__) from None
            if replaced is not None:
                del self._loaded[replaced]  # its slot is written over now
            try:
                for path, layer in self._layers.items():
                    layer.put(slot, *pairs.get(path, (None, None)))
            except Exception as exc:  # noqa: BLE001 - half written, the slot is free again
                raise AdapterLoadError(name, str(exc) or type(exc).__name__) from None
            self._loaded[name] = slot
            logger.info("adapter %s loaded into slot %d%s", name, slot, f", replacing {replaced}" if replaced else "")
        self._loaded.move_to_end(name)
        return slot

    def _free_slot(self, in_use: set[str]) -> tuple[int, str | None] | None:
        """A slot for another adapter, and the adapter it holds (None if it is free)."""
        taken = set(self._loaded.values())
        for slot in range(1, self.slots + 1):
            if slot not in taken:
                return slot, None
        for name, slot in self._loaded.items():  # least recently used first
            if name not in in_use:
                return slot, name
        return None

    def _weights_file(self, name: str) -> Path:
        return self._folders[name] / "adapter_model.safetensors"

    def _read(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adapter ``name``'s ``(A, B)`` per layer path, ``B`` scaled, checked against the
        model."""
        weights = load_file(str(self._weights_file(name)))
        pairs = self._pairs(name, {key: tuple(tensor.shape) for key, tensor in weights.items()})
        scale = self._configs[name].scale
        return {path: (weights[a], weights[b] * scale) for path, (a, b) in pairs.items()}

    def _pairs(self, name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
        """The keys of each layer's ``A`` and ``B`` in an adapter's weights, once their
        ``shapes`` are checked against the model's layers and the adapter's rank.

        Raises:
            ValueError: naming the adapter and what does not fit.
        """
        keys: dict[str, dict[str, str]] = collections.defaultdict(dict)
        for key in shapes:
            path, _, kind = key.removeprefix(_KEY_PREFIX).rpartition(".lora_")
            keys[path][kind.removesuffix(".weight")] = key
        unknown = set(keys) - set(self._layers)
        if unknown:
            raise ValueError(f"adapter {name} has weights for layers this model lacks: {sorted(unknown)[:3]}")
        rank = self._configs[name].rank
        pairs = {}
        for path, kinds in keys.items():
            if set(kinds) != {"A", "B"}:
                raise ValueError(f"adapter {name}: layer {path} needs lora_A and lora_B, has {sorted(kinds)}")
            layer = self._layers[path].base
            expected = {"A": (rank, layer.in_features), "B": (layer.out_features, rank)}
            for kind, shape in expected.items():
                if tuple(shapes[kinds[kind]]) != shape:
                    raise ValueError(
                        f"adapter {name}: {kinds[kind]} is {list(shapes[kinds[kind]])}, the model needs {list(shape)} "
                        f"(rank {rank})"
                    )
            pairs[path] = (kinds["A"], kinds["B"])
        return pairs
