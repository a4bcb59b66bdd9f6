"""Mixture-of-experts feed-forward layer: fp32 top-k router, dropless sort-based dispatch, grouped matmul.

Notable choices:
- Experts are stacked tensors (``w_gate_up`` (E, H, 2I), ``w_down`` (E, I, H)), so one grouped matmul runs all
  experts, and every expert is part of the same Parameter: an expert that receives no tokens still gets a
  (zero) gradient, and DDP never sees an unused parameter.
- Dispatch is dropless: token copies are sorted by expert, multiplied group by group, permuted back to token
  order and combined with their gates by one batched matmul. Activations move by gathers (forward and
  backward), never by a scatter-add.
- Group matmuls (``dispatch``, or ``LLM_MOE_DISPATCH`` for every layer built without one):
  ``"grouped_mm"``: ``torch._grouped_mm``. In torch 2.13 the CPU kernel takes fp32 and bf16 (CUDA: bf16 on
  sm80+), needs 16-byte aligned rows (hidden and intermediate sizes multiple of 4 in fp32, 8 in bf16), its
  backward rejects broadcast gradients (handled here), and its fake kernel (what torch.compile traces) takes bf16
  only. ``"loop"``: ``mm`` over contiguous slices with a hand-written backward; it reads the group sizes on the
  host, so under torch.compile it sits behind a deliberate graph break. ``"padded"``: each expert's rows padded
  to whole blocks of a static size, one ``bmm`` over the blocks with per-block weight copies; no host read and
  static shapes, so a model compiles as one graph, at the price of E*B extra rows (25% at 1024 rows per expert,
  more with fewer) and the weight copies.
  ``"auto"``: grouped_mm wherever it runs (no slower than the loop on a CPU), else the loop (faster than padded
  in eager and, on a CPU, compiled: benchmarks/RESULTS.md), except under torch.compile on an accelerator, where
  the sync-free padded path keeps the step free of host syncs and graph breaks (fp32 on CUDA, fp16, unaligned
  sizes, older GPUs).
- Losses: the Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (f_e = share of the N*k routed
  token copies that go to expert e, P_e = mean router probability; 1.0 when perfectly balanced; Mixtral's form
  is this times top_k) and the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE). Each layer stores
  ``aux_loss_coef * balance + z_loss_coef * z`` of its last forward in ``aux_loss``; ``llm.models.hooks.aux_loss`` sums
  them over any module tree.
- Balance statistics (``balance``): ``"global"`` (default) counts f_e over the whole global batch: the counts are
  summed over the data-parallel group (:meth:`MoELayer.set_data_parallel_group`) and, inside an optimizer step that
  the engine opens with :meth:`MoELayer.begin_step` (through ``llm.models.hooks``), over the micro-batches so far.
  N processes then optimize the same objective as one process with their global batch (P_e's gradient is averaged
  by DDP/FSDP like the loss's), and the looser constraint lets experts specialise by domain instead of balancing
  every micro-batch (Qiu et al. 2025, "Demons in the Detail: On Implementing Load Balancing Loss for Training
  Specialized Mixture-of-Expert Models"). The counts of micro-batches still to come in a step are not known yet, so
  with gradient accumulation micro-batch m uses micro-batches 1..m. ``"micro"``: each forward's own counts (Switch,
  Mixtral). ``"aux_free"``: no balance loss; a per-expert bias added to the router scores for the top-k choice only
  (not the gates, not the gradient) moves by ``bias_update_rate`` after each optimizer step against the step's
  global load (DeepSeek-V3's auxiliary-loss-free balancing, Wang et al. 2024).
- Expert parallelism: with :attr:`MoELayer.ep` set (see ``llm.models.moe.exchange``; ``llm.models.moe.parallel``
  shards the layers) the layer holds only its rank's experts and exchanges token rows with all-to-all.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.errors import invalid
from llm.models.config import BALANCES, ModelConfig
from llm.models.layers import MLP
from llm.models.moe.kernels import (  # noqa: F401  (block_layout, block_rows, grouped_mm_supported: re-exported)
    _BlockMatmul,
    _DispatchRows,
    _PermuteRows,
    _SelectRows,
    _SwiGLU,
    block_layout,
    block_rows,
    grouped_matmul,
    grouped_mm_supported,
)

Dispatch = Literal["auto", "grouped_mm", "loop", "padded"]
DISPATCHES: tuple[str, ...] = ("auto", "grouped_mm", "loop", "padded")
# Sets the dispatch of every MoE layer built without an explicit one (the engine's models included): a way to
# force a path for tests, benchmarks and workarounds without a code change.
DISPATCH_ENV = "LLM_MOE_DISPATCH"


def default_dispatch() -> Dispatch:
    """The dispatch that ``LLM_MOE_DISPATCH`` names, ``"auto"`` when it is unset or empty."""
    value = os.environ.get(DISPATCH_ENV, "") or "auto"
    if value not in DISPATCHES:
        raise invalid(DISPATCH_ENV, value, f"expected one of {', '.join(DISPATCHES)}", DISPATCHES)
    return value  # type: ignore[return-value]  (checked above)


# -------------------------------------------------------------------------------------------------------- layer
class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts, plus ``num_shared_experts`` always-on experts fused into one dense MLP.

    After each forward: ``aux_loss`` (scalar, coefficients applied) and ``tokens_per_expert`` (E,) long, detached.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        num_shared_experts: int = 0,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        norm_topk_prob: bool = True,
        dispatch: Dispatch | None = None,
        balance: str = "global",
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        dispatch = default_dispatch() if dispatch is None else dispatch
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.norm_topk_prob = norm_topk_prob  # Mixtral renormalizes the k gates to sum to 1
        self.dispatch = dispatch
        self.balance = balance
        self.bias_update_rate = bias_update_rate
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # router; HF name `block_sparse_moe.gate`
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.shared_experts = MLP(hidden_size, num_shared_experts * intermediate_size) if num_shared_experts else None
        # Plain attributes, not buffers: DDP would broadcast buffers from rank 0 and hide per-rank load.
        self.aux_loss: Tensor | None = None
        self.tokens_per_expert: Tensor = torch.zeros(num_experts, dtype=torch.long)
        # Aux-loss-free routing bias: part of the model (saved, resumed) only where it is used.
        self.register_buffer("routing_bias", torch.zeros(num_experts), persistent=balance == "aux_free")
        self.balance_group: Any = None  # process group whose ranks' batches form one global batch
        self.ep: Any = None  # this rank's share of the experts under expert parallelism (llm.models.moe.exchange)
        self.balance_loss: Tensor | None = None  # the last forward's unscaled losses, detached, for logging
        self.z_loss: Tensor | None = None
        self._step_counts: Tensor | None = None  # global copies per expert in the open optimizer step
        # The balance counts of the training forwards not yet recomputed (activation checkpointing), last on top
        self._forward_counts: list[Tensor] = []
        self._window_counts: Tensor | None = None  # this rank's copies per expert since the last routing log
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)

    @classmethod
    def from_config(cls, config: ModelConfig, dispatch: Dispatch | None = None) -> MoELayer:
        """The MoE layer of one block of a ``config`` model (expert width: ``moe_intermediate_size``, resolved).

        ``dispatch`` None: what ``LLM_MOE_DISPATCH`` names, else ``"auto"``.
        """
        c = config.resolved()
        return cls(
            c.hidden_size, c.num_experts, c.top_k, c.moe_intermediate_size,  # type: ignore[arg-type]  (resolved)
            num_shared_experts=c.num_shared_experts, aux_loss_coef=c.moe_aux_loss_coef, z_loss_coef=c.moe_z_loss_coef,
            norm_topk_prob=c.moe_norm_topk_prob, dispatch=dispatch, balance=c.moe_balance,
            bias_update_rate=c.moe_bias_update_rate,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, dispatch={self.dispatch}, balance={self.balance}"
            + (f", expert_parallel={self.ep.size}" if self.ep is not None else "")
        )

    # ------------------------------------------------------------------------------------------------ routing
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router on ``x`` (N, H): returns logits (N, E) fp32, gates (N, k) fp32, expert ids (N, k)."""
        # fp32 router: in bf16, near-equal logits round to ties and top-k choices flip on tiny input changes.
        if isinstance(self.gate, nn.Linear):
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        else:  # a wrapped router (a LoRA adapter, llm.models.lora) adds its own output: reading .weight would skip it
            logits = self.gate(x.to(self.gate.weight.dtype)).float()  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        if self.balance == "aux_free":  # the bias steers the choice only; the gates stay the router's probabilities
            experts = (probs + self.routing_bias).topk(self.top_k, dim=-1).indices  # (N, k)
            gates = probs.gather(1, experts)
        else:
            gates, experts = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, gates, experts

    def losses(self, logits: Tensor, experts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Load-balancing loss and router z-loss (both unscaled) from logits (N, E), ids (N, k), counts (E,).

        ``counts`` are the copies per expert the fractions f_e come from: this forward's, or the global batch's
        (:meth:`balance_counts`).
        """
        fraction = counts.to(logits.dtype) / counts.sum().clamp(min=1)  # (E,) f_e, no gradient (as in Switch)
        mean_prob = logits.softmax(dim=-1).mean(dim=0)  # (E,) P_e
        balance = self.num_experts * (fraction * mean_prob).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return balance, z_loss

    def balance_counts(self, counts: Tensor) -> Tensor:
        """The copies per expert that f_e is computed from, for this forward's ``counts`` (E,) (see the module doc).

        Under ``"global"`` and ``"aux_free"`` they are summed over the balance group and the open step's earlier
        micro-batches (a collective on every rank of the group, in every training forward).
        """
        if self.balance == "micro" or not (self.training and torch.is_grad_enabled()):
            return counts
        total = counts
        if self.balance_group is not None:
            from torch.distributed import _functional_collectives as fc  # traceable by torch.compile

            total = fc.all_reduce(counts, "sum", self.balance_group)
        if self._step_counts is not None:
            total = total + self._step_counts
            self._step_counts = total.detach()
        return total

    def begin_step(self) -> None:
        """Open an optimizer step: balance counts accumulate over its micro-batches until :meth:`end_step`."""
        self._forward_counts = []
        self._step_counts = torch.zeros(self.num_experts, dtype=torch.long, device=self.gate.weight.device)

    @torch.no_grad()
    def end_step(self, applied: bool = True) -> None:
        """Close the step; under ``"aux_free"`` an ``applied`` (not refused) step moves the routing bias: up for
        experts below the mean load, down for those above (every rank holds the same global counts)."""
        load, self._step_counts = self._step_counts, None
        if self.balance == "aux_free" and applied and load is not None:
            # No host read of the load (a sync per layer and step): a step that routed nothing has every load at
            # the mean, so its sign is 0 and the bias stays.
            load = load.float()
            self.routing_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_update_rate)

    # -------------------------------------------------------------------- model hooks (llm.models.hooks)
    def step_aux_loss(self) -> Tensor | None:
        """The last forward's auxiliary loss (coefficients applied), for the trainer to add to the objective."""
        return self.aux_loss

    def step_metrics(self) -> dict[str, Tensor]:
        """The last forward's unscaled balance and z losses (detached); averaged over the layers by the hooks."""
        if self.balance_loss is None:
            return {}
        return {"moe_balance_loss": self.balance_loss, "moe_z_loss": self.z_loss}

    def set_data_parallel_group(self, group: Any) -> None:
        """The ranks of ``group`` make one global batch for the balance statistics (None: this process alone)."""
        self.balance_group = group

    def router_parameters(self) -> list[nn.Parameter]:
        """The router's weights: logits over experts, not a hidden map (optimizers keep them off Muon)."""
        return list(self.gate.parameters())

    @staticmethod
    def window_metrics(counts: Tensor) -> dict[str, float]:
        """Routing metrics from the layers' windows stacked (layers, E) and summed over ranks (`routing_metrics`)."""
        return routing_metrics(counts)

    def take_window(self) -> Tensor:
        """This rank's routed copies per expert since the last call (E,), and a fresh window."""
        counts = self._window_counts
        self._window_counts = None
        return counts if counts is not None else torch.zeros(self.num_experts, dtype=torch.long,
                                                             device=self.gate.weight.device)

    def expert_weight(self, name: str) -> Tensor:
        """The stacked expert weight ``name`` (``w_gate_up`` or ``w_down``) as the experts compute with it: the
        parameter, or, when a LoRA adapter is attached as submodule ``lora_<name>`` (llm.models.lora_experts), the
        parameter with the adapter applied."""
        weight = self._parameters[name]
        adapter = self._modules.get("lora_" + name)
        return weight if adapter is None else adapter(weight)

    # ---------------------------------------------------------------------------------------------- dispatch
    def _use_grouped_mm(self, x: Tensor) -> bool:
        if self.dispatch in ("loop", "padded"):
            return False
        # The down projection's input rows are I wide; they need the same alignment as x's rows.
        aligned = (self.intermediate_size * x.element_size()) % 16 == 0
        supported = aligned and grouped_mm_supported(x, 2 * self.intermediate_size)
        # torch 2.13's meta (fake-tensor) kernel of _grouped_mm takes bf16 only, so under torch.compile an fp32
        # model would fail to trace; it takes a fallback instead (`_path`).
        supported = supported and not (torch.compiler.is_compiling() and x.dtype != torch.bfloat16)
        if self.dispatch == "grouped_mm" and not supported:
            raise RuntimeError(
                f"torch._grouped_mm does not support {x.dtype} on {x.device.type} with hidden_size "
                f"{self.hidden_size} and intermediate_size {self.intermediate_size} (rows must be 16-byte aligned)"
            )
        return supported

    def _path(self, x: Tensor) -> Literal["grouped_mm", "loop", "padded"]:
        """The expert-matmul path for ``x`` (already in the compute dtype) under ``self.dispatch``.

        Where grouped_mm cannot run, "auto" takes the loop, except when compiling for an accelerator: there the
        loop's host reads would stall the device and split the graph twice per layer, so the sync-free padded
        blocks run instead, in one graph. On a CPU a host read costs nothing and the padded path's extra rows and
        weight copies made a compiled layer 1.7x slower (benchmarks/RESULTS.md, MoE fallback).
        """
        if self.dispatch in ("loop", "padded"):
            return self.dispatch  # type: ignore[return-value]
        if self._use_grouped_mm(x):
            return "grouped_mm"
        return "padded" if torch.compiler.is_compiling() and x.device.type != "cpu" else "loop"

    def experts_forward(self, x: Tensor, gates: Tensor, experts: Tensor, counts: Tensor) -> Tensor:
        """Dropless expert computation for ``x`` (N, H) routed to ``experts`` (N, k) with ``gates`` (N, k)."""
        N, H = x.shape
        k = self.top_k
        if N == 0:
            # No tokens at all: keep every expert weight in the graph so DDP still reduces its (zero) gradient.
            weights = self.expert_weight("w_gate_up").sum() + self.expert_weight("w_down").sum()
            return x.new_zeros(0, H) + 0.0 * weights
        order = experts.reshape(-1).argsort(stable=True)  # (N*k,) token copies grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # (N*k,) sorted slot of each copy
        token = order // k  # (N*k,) token of each sorted copy
        # Autocast does not reach grouped_mm, bmm on gathered weights or the loop's mm(out=...): cast as it would
        # for a Linear.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        w_gate_up, w_down = self.expert_weight("w_gate_up").to(dtype), self.expert_weight("w_down").to(dtype)
        x_in = x.to(dtype)
        path = self._path(x_in)
        if path == "padded":
            layout = block_layout(experts.reshape(-1).index_select(0, order), counts)
            row_of_copy = layout.slot_of_row.index_select(0, inverse)  # (N*k,) padded row of each copy
            x_rows = _DispatchRows.apply(x_in, token.index_select(0, layout.row_of_slot), row_of_copy, k)  # (NB*B, H)
            h = _BlockMatmul.apply(x_rows, w_gate_up, layout.block_expert)  # (NB*B, 2I)
            y = _BlockMatmul.apply(_SwiGLU.apply(h), w_down, layout.block_expert)  # (NB*B, H)
            y = _SelectRows.apply(y, row_of_copy)  # (N*k, H) in token order
        else:
            offsets = counts.cumsum(0).to(torch.int32)  # (E,)
            use_gmm = path == "grouped_mm"
            x_sorted = _DispatchRows.apply(x_in, token, inverse, k)  # (N*k, H)
            h = grouped_matmul(x_sorted, w_gate_up, counts, offsets, use_gmm)  # (N*k, 2I)
            y = grouped_matmul(_SwiGLU.apply(h), w_down, counts, offsets, use_gmm)  # (N*k, H)
            y = _PermuteRows.apply(y, inverse, order)  # (N*k, H) back in token order
        # Weighted sum over the k experts as a batched (1, k) @ (k, H) product: no scatter-add needed.
        return torch.bmm(gates.to(y.dtype).unsqueeze(1), y.view(N, k, H)).squeeze(1).to(x.dtype)  # (N, H)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits, gates, experts = self.route(x)
        flat = experts.reshape(-1)
        # Not bincount: its output length depends on the data, which breaks the graph under torch.compile.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )  # (E,)
        # Activation checkpointing re-runs this forward inside backward: the losses were taken the first time, and
        # the balance collective and the step's counts must not run (or count) twice. The recomputation still runs
        # the same operations and must save the same tensors: the balance loss's gradient is scaled by the fractions
        # f_e, so it takes the counts the first forward used (the global batch's, the step's so far), kept for it.
        # Backward visits forwards in reverse order (a later forward's nodes first), hence a stack.
        recomputing = _recomputing()
        if recomputing:
            balance_counts = self._forward_counts.pop() if self._forward_counts else counts
        else:
            balance_counts = self.balance_counts(counts)
            if self.training and torch.is_grad_enabled():
                self._forward_counts = [*self._forward_counts[-(_KEPT_FORWARDS - 1):], balance_counts.detach()]
        balance, z_loss = self.losses(logits, experts, balance_counts)
        if not recomputing:
            self.balance_loss, self.z_loss = balance.detach(), z_loss.detach()
            if self.balance == "aux_free":
                balance = balance.detach()  # reported, never optimized: the bias does the balancing
            self.aux_loss = (self.aux_loss_coef if self.balance != "aux_free" else 0.0) * balance \
                + self.z_loss_coef * z_loss
            self.tokens_per_expert = counts.detach()
            if self.training:
                window = self._window_counts
                self._window_counts = counts.detach() if window is None else window + counts.detach()
        if self.ep is not None:  # expert parallelism (llm.models.moe.exchange)
            out = self.ep.experts_forward(self, x, gates, experts, counts)  # (N, H)
        else:
            out = self.experts_forward(x, gates, experts, counts)  # (N, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


_KEPT_FORWARDS = 16  # forwards whose balance counts wait for a recomputation (without one, a bounded few)


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass (activation checkpointing's recomputation)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


# ------------------------------------------------------------------------------------------------- aux losses
_CACHE_ATTR = "_llm_moe_layers"


def moe_layers(module: nn.Module, refresh: bool = False) -> list[MoELayer]:
    """All MoELayers inside ``module`` (itself included), cached on the module after the first walk.

    Pass ``refresh=True`` after swapping submodules; wrapping (DDP, torch.compile) needs no refresh.
    """
    cached = module.__dict__.get(_CACHE_ATTR)
    if cached is None or refresh:
        cached = [m for m in module.modules() if isinstance(m, MoELayer)]
        module.__dict__[_CACHE_ATTR] = cached  # bypass nn.Module.__setattr__: not a submodule list
    return cached


def routing_metrics(counts: Tensor) -> dict[str, float]:
    """Per-layer load from (layers, E) copies per expert (summed over ranks): the busiest expert's load over the
    mean (1.0 = perfectly balanced) and each expert's fraction of the routed copies."""
    counts = counts.double()
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    peak = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-12)
    logs: dict[str, float] = {}
    for i, (layer_peak, layer_fractions) in enumerate(zip(peak.tolist(), fractions.tolist())):
        logs[f"moe/layer{i}/max_over_mean"] = layer_peak
        logs.update({f"moe/layer{i}/expert{e}": f for e, f in enumerate(layer_fractions)})
    return logs
