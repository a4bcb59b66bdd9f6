"""Tensor parallelism (`distributed.tensor_parallel` = T): each attention layer's heads and each MLP's columns split
over the T ranks of a tensor-parallel group, with `torch.distributed.tensor.parallel`.

The split (Megatron's): `q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj` are column-parallel (each rank computes
its heads / its slice of the MLP width from the whole input), `o_proj` and `down_proj` row-parallel (each rank's
partial product, summed by one all-reduce per layer in the forward and one in the backward). Each rank's `Attention`
then holds `num_heads / T` query and `num_kv_heads / T` key/value heads (its attributes say so, and a KV cache for
generation is sized by them).

Everything else (embeddings, norms, output head, routers, MoE experts, a task's own parameters) is replicated over
the group: a `Replicate` DTensor, so that every parameter of the model is a DTensor of the same mesh and the
optimizer, gradient clipping and torch's distributed checkpoint treat them alike. A replicated parameter's module runs
on the plain local tensor (a forward pre-hook swaps it in, the post-hook back), so the model code never meets a
DTensor; the group's ranks hold the same input and the same upstream gradient, so their replicated gradients are
equal.

Sequence and loss parallelism (`distributed.sequence_parallel`, Megatron-SP; `DecoderModel`s of the lm and sft
tasks): between the split layers the residual stream is a `Shard(1)` DTensor, each rank holding `seq_len / T`
positions (uneven lengths are padded by DTensor), and the norms run on those shards (`SequenceParallel`). Before the
column-parallel projections the stream is all-gathered (`PrepareModuleInput` to `Replicate`, kept a DTensor so that
the q/k/v (gate/up) input gradients are summed as one partial sum and reduce-scattered once); the row-parallel
projections reduce-scatter onto sequence shards instead of all-reducing. Attention itself still sees the whole
sequence of its heads: positions, rotary tables and document masks are built from the whole batch, which every
rank of the group holds. The embedding table and the output head are split along the vocabulary (a tied pair stays
tied: both are `Shard(0)`), so the logits of a training step are a vocabulary-sharded DTensor and cross-entropy runs
under `torch.distributed.tensor.parallel.loss_parallel` (`loss_parallel_block`, entered by the plan around each
micro-batch's forward and backward): the whole (tokens x vocabulary) logits never exist on a rank. Outside such a
block (validation, generation) the model returns whole logits (`_whole_output`). An MoE layer runs whole on the
gathered sequence, as without sequence parallelism. In the blocks the exchange is the same bytes as the all-reduces
it replaces (an all-reduce is a reduce-scatter plus an all-gather); the vocabulary split adds a reduce-scatter after
the embedding, an all-gather before the head and the loss's per-token all-reduces. Norms, residual adds and their
saved activations shrink T times, and so do the logits; it is off by default because it is newer and narrower
(see docs/scale-out.md).

`check_composition` refuses what this does not support, as one line naming both flags, before any process starts.
`reduce_gradients` averages gradients over the data-parallel ranks (the DDP half of TP x DDP), `clip_grad_norm` takes
the norm of gradients sharded over any dimensions of the mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llm.errors import ConfigError, UserError
from llm.training.parallel.mesh import check_tensor_parallel_degree

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output features
ROW = ("o_proj", "down_proj")  # split by input features, partial sums all-reduced
BUCKET_ELEMENTS = 1 << 25  # gradient all-reduce buckets (elements), as DDP's 25 MB order of magnitude


# ---------------------------------------------------------------------------------------------
# What may be combined (config time)
# ---------------------------------------------------------------------------------------------


def check_composition(size: int, world_size: int | None, model_config: Any, training: Any, distributed: Any) -> None:
    """Refuse a `distributed.tensor_parallel` the world size (None: not known yet), the model or the rest of the run
    cannot take, in one line naming both flags."""
    check_tensor_parallel_degree(size, world_size)
    if size == 1:
        if getattr(distributed, "sequence_parallel", False):
            raise ConfigError("distributed.sequence_parallel: it splits the sequence over a tensor-parallel group; "
                              "it needs --distributed-tensor-parallel > 1 (or drop --distributed-sequence-parallel)")
        return
    flag = f"--distributed-tensor-parallel {size}"
    ep = distributed.expert_parallel
    if ep > 1 and world_size is not None and (world_size // size) % ep:  # the experts split over dp ranks
        raise ConfigError(
            f"distributed.expert_parallel: {ep} must divide the data-parallel degree {world_size // size} (processes "
            f"/ {flag}); pick --distributed-expert-parallel and --distributed-tensor-parallel whose product divides "
            "the number of processes"
        )
    if training.lora_rank:
        raise ConfigError(f"training.lora_rank: {training.lora_rank} (LoRA) is not supported with {flag}; use "
                          "--training-lora-rank 0 or --distributed-tensor-parallel 1")
    if training.precision == "fp16":
        raise ConfigError(f"training.precision: fp16 is not supported with {flag} (its loss scaler would need "
                          "split gradients); use --training-precision bf16")
    if model_config is None:
        return
    m = model_config.resolved() if hasattr(model_config, "resolved") else model_config
    if getattr(m, "dropout", 0.0):
        raise ConfigError(f"model.dropout: {m.dropout} is not supported with {flag} (the ranks of a tensor-parallel "
                          "group would drop different activations); use --model-dropout 0")
    for field, value in (("num_heads", m.num_heads), ("num_kv_heads", m.num_kv_heads or m.num_heads)):
        if value % size:
            raise ConfigError(f"model.{field}: {value} is not divisible by distributed.tensor_parallel {size} "
                              f"(--model-{field.replace('_', '-')} must be a multiple of {flag.split()[0]})")
    dense = not m.use_moe or any(not m.is_moe_layer(i) for i in range(m.num_layers))
    if dense and m.intermediate_size % size:
        raise ConfigError(f"model.intermediate_size: {m.intermediate_size} is not divisible by "
                          f"distributed.tensor_parallel {size} (--model-intermediate-size must be a multiple of "
                          "--distributed-tensor-parallel)")


#: The tasks whose losses take vocabulary-split logits (`plain` in their loss functions); their validation and
#: generation see whole logits.
SEQUENCE_PARALLEL_TASKS = ("lm", "sft")


def check_sequence_parallel(task: str, distributed: Any) -> None:
    """Refuse `distributed.sequence_parallel` for a task whose loss does not take vocabulary-split logits, in one
    line naming both flags (the degree is `check_composition`'s)."""
    if getattr(distributed, "sequence_parallel", False) and task not in SEQUENCE_PARALLEL_TASKS:
        raise ConfigError(f"distributed.sequence_parallel: not supported by --task {task} (its loss takes whole "
                          f"logits; supported: {', '.join(SEQUENCE_PARALLEL_TASKS)}); drop "
                          "--distributed-sequence-parallel (--distributed-tensor-parallel alone works)")
    if getattr(distributed, "sequence_parallel", False) and getattr(distributed, "expert_parallel", 1) > 1:
        # Not run together yet: MoE layers take the gathered sequence, the experts' all-to-all was only checked
        # without the sequence shards. Refused rather than trusted untested.
        raise ConfigError(f"distributed.sequence_parallel: --distributed-sequence-parallel (with "
                          f"--distributed-tensor-parallel {distributed.tensor_parallel}) is not combined with "
                          f"--distributed-expert-parallel {distributed.expert_parallel} (yet); drop one of the two")


# ---------------------------------------------------------------------------------------------
# Laying the model out
# ---------------------------------------------------------------------------------------------


def split_layers(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The attention layers and dense MLPs of `model` that tensor parallelism splits."""
    from llm.models.layers import MLP, Attention

    return ([m for m in model.modules() if isinstance(m, Attention)],
            [m for m in model.modules() if isinstance(m, MLP)])


def parallelize(model: nn.Module, mesh: Any, sequence_parallel: bool = False) -> nn.Module:
    """Split `model`'s attention heads and MLP columns over the 1-D tensor-parallel `mesh` and replicate the rest
    (in place; the ranks' weights must already be equal); with `sequence_parallel`, also shard the residual stream
    and norms along the sequence and the embedding and output head along the vocabulary. Returns `model`."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    size = mesh.size()
    attentions, mlps = split_layers(model)
    if not attentions and not mlps:
        raise UserError(f"distributed.tensor_parallel: {size}: {type(model).__name__} has no attention or MLP "
                        "layers to split; use --distributed-tensor-parallel 1")
    for attn in attentions:
        if attn.num_heads % size or attn.num_kv_heads % size:
            raise UserError(f"distributed.tensor_parallel: {size} must divide the attention heads ({attn.num_heads} "
                            f"query, {attn.num_kv_heads} key/value) of {type(model).__name__}")
    for mlp in mlps:
        if mlp.gate_proj.out_features % size:
            raise UserError(f"distributed.tensor_parallel: {size} must divide the MLP width "
                            f"({mlp.gate_proj.out_features}) of {type(model).__name__}")
    if sequence_parallel:
        check_sequence_parallel_model(model)
    # Under sequence parallelism a row-parallel output is reduce-scattered onto sequence shards, kept a DTensor.
    row = (lambda: RowwiseParallel(output_layouts=Shard(1), use_local_output=False)) if sequence_parallel \
        else RowwiseParallel
    for module in [*attentions, *mlps]:
        plan = {name: ColwiseParallel() for name in COLUMN if hasattr(module, name)}
        plan.update({name: row() for name in ROW if hasattr(module, name)})
        parallelize_module(module, mesh, plan)
    if sequence_parallel:
        _shard_sequence(model, mesh)
    for attn in attentions:  # this rank's heads: the views, the GQA ratio (unchanged) and a KV cache's size
        attn.num_heads //= size
        attn.num_kv_heads //= size
        attn.tensor_parallel = size
    replicate_rest(model, mesh)
    return model


def check_sequence_parallel_model(model: nn.Module) -> None:
    """Refuse a model sequence parallelism cannot lay out: it needs the decoder's layout (an embedding, blocks of
    norms, attention and MLP, a final norm, an output head). The vocabulary need not divide by T (DTensor pads)."""
    from llm.models.decoder import DecoderModel

    if not isinstance(model, DecoderModel):
        raise UserError(f"distributed.sequence_parallel: {type(model).__name__} is not a DecoderModel; sequence "
                        f"parallelism lays out decoders only (drop --distributed-sequence-parallel)")


def _shard_sequence(model: nn.Module, mesh: Any) -> None:
    """The sequence- and loss-parallel layout of a `DecoderModel` whose attention and MLPs are already split (see
    the module docstring): which tensors are sequence shards, where they are gathered, and the vocabulary split."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from llm.models.layers import MLP

    seq, whole = Shard(1), Replicate()
    # The embedding's rows are split by vocabulary; its partial sums are reduce-scattered onto sequence shards.
    plan: dict[str, Any] = {
        "embed_tokens": RowwiseParallel(input_layouts=whole, output_layouts=seq, use_local_output=False),
        "norm": SequenceParallel(),
        # the head's input is gathered, its logits stay split by vocabulary (the loss is parallel too)
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        plan[prefix + "input_layernorm"] = SequenceParallel()
        plan[prefix + "post_attention_layernorm"] = SequenceParallel()
        # (x, cos, sin, attn_mask, cache): only x is a sequence shard; it is gathered, kept a DTensor
        plan[prefix + "self_attn"] = PrepareModuleInput(
            input_layouts=(seq, None, None, None, None), desired_input_layouts=(whole, None, None, None, None),
            use_local_output=False)
        if isinstance(block.mlp, MLP):
            plan[prefix + "mlp"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(whole,),
                                                      use_local_output=False)
        else:  # an MoE layer runs whole on every rank of the group (its experts are replicated)
            plan[prefix + "mlp"] = (
                PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(whole,), use_local_output=True),
                PrepareModuleOutput(output_layouts=(whole,), desired_output_layouts=(seq,), use_local_output=False),
            )
    tied = model.lm_head.weight is model.embed_tokens.weight
    for name, style in plan.items():
        styles = style if isinstance(style, tuple) else (style,)
        for one in styles:
            parallelize_module(model.get_submodule(name), mesh, one)
    if tied:  # both are split along the vocabulary (dim 0): one parameter again
        model.lm_head.weight = model.embed_tokens.weight
    model.register_forward_hook(_whole_output)


# How many `loss_parallel_block`s are open: torch's context is not re-entrant (its exit disables the loss ops).
_loss_parallel_depth = 0


@contextlib.contextmanager
def loss_parallel_block() -> Iterator[None]:
    """`torch.distributed.tensor.parallel.loss_parallel`, re-entrant: cross-entropy on vocabulary-sharded logits
    (forward and backward) inside; a sequence-parallel model returns such logits only inside."""
    from torch.distributed.tensor.parallel import loss_parallel

    global _loss_parallel_depth
    if _loss_parallel_depth:
        _loss_parallel_depth += 1
        try:
            yield
        finally:
            _loss_parallel_depth -= 1
        return
    with loss_parallel():
        _loss_parallel_depth = 1
        try:
            yield
        finally:
            _loss_parallel_depth = 0


def _whole_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Outside a `loss_parallel_block` a sequence-parallel model returns whole plain tensors (the logits gathered
    along the vocabulary, hidden states along the sequence), as any other layout does."""
    from torch.distributed.tensor import DTensor

    if _loss_parallel_depth or not isinstance(output, DTensor):
        return output
    return output.full_tensor()


def plain(value: torch.Tensor) -> torch.Tensor:
    """A loss computed under `loss_parallel_block` (a replicated DTensor) as the plain tensor every rank holds; any
    other tensor as it is. Differentiable: the tasks' minimal hook for loss parallelism."""
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def replicate_rest(model: nn.Module, mesh: Any) -> None:
    """Make every parameter that is not yet a DTensor a `Replicate` one on `mesh` (tied parameters stay tied), and
    let the modules owning them compute with the plain local tensors.

    A module that owns such parameters swaps in the local tensors of its own and of its descendants' (a layer may read
    a child's weight without calling the child, as the MoE router does), down to the next FSDP unit (whose
    parameters FSDP gathers only when that unit runs)."""
    from torch.distributed.tensor import DTensor, Replicate

    from llm.training.parallel.fsdp import fsdp_units

    made: dict[int, nn.Parameter] = {}
    owners: list[nn.Module] = []
    for module in model.modules():
        names = [n for n, p in module._parameters.items() if p is not None and not isinstance(p, DTensor)]
        for name in names:
            param = module._parameters[name]
            if id(param) not in made:
                local = DTensor.from_local(param.data, mesh, [Replicate()], run_check=False)
                made[id(param)] = nn.Parameter(local, requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]
        if names:
            owners.append(module)
    replicated = {id(p) for p in made.values()}
    units = {id(unit) for unit in fsdp_units(model)}
    for module in owners:
        module._replicated = _replicated_within(module, replicated, units)
        module.register_forward_pre_hook(_swap_in_local)
        module.register_forward_hook(_swap_back, always_call=True)


def _replicated_within(module: nn.Module, replicated: set[int], units: set[int]) -> list[tuple[nn.Module, str]]:
    """(owner, name) of the replicated parameters of `module` and of its descendants outside other FSDP units."""
    found, stack = [], [module]
    while stack:
        owner = stack.pop()
        found += [(owner, n) for n, p in owner._parameters.items() if p is not None and id(p) in replicated]
        stack += [child for child in owner.children() if id(child) not in units]
    return found


def _swap_in_local(module: nn.Module, args: Any) -> None:
    """Before the forward: the replicated parameters as their local tensors (autograd flows back into the DTensor
    parameter, whose gradient is then a `Replicate` DTensor). An enclosing module may have swapped them already."""
    from torch.distributed.tensor import DTensor

    saved = []
    for owner, name in module._replicated:
        param = owner._parameters[name]
        if isinstance(param, DTensor):
            saved.append((owner, name, param))
            owner._parameters[name] = param.to_local()
    module._replicated_saved = saved


def _swap_back(module: nn.Module, args: Any, output: Any) -> None:
    for owner, name, param in getattr(module, "_replicated_saved", None) or ():
        owner._parameters[name] = param
    module._replicated_saved = None


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def reduce_gradients(params: list[torch.Tensor], group: Any, size: int) -> None:
    """Average the gradients of `params` over the `size` ranks of `group` (data parallelism across tensor-parallel
    groups: what DDP's all-reduce does), in buckets of at most `BUCKET_ELEMENTS` elements per dtype."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    for p in params:
        if p.grad is None:
            continue
        grad = _local(p.grad)
        buckets = by_dtype.setdefault(grad.dtype, [[]])
        if buckets[-1] and sum(g.numel() for g in buckets[-1]) + grad.numel() > BUCKET_ELEMENTS:
            buckets.append([])
        buckets[-1].append(grad)
    for buckets in by_dtype.values():
        for bucket in buckets:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            flat.div_(size)
            for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(reduced)


def summed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The replicated parameters whose gradients are partial sums over the tensor-parallel group: the QK-norm weights
    of split attention layers (each rank normalises its own heads with the shared weight). Call it once the model is
    laid out for good (FSDP replaces parameters)."""
    attentions, _ = split_layers(model)
    return [p for attn in attentions for norm in (attn.q_norm, attn.k_norm) if norm is not None
            for p in norm.parameters() if p.requires_grad]


@torch.no_grad()
def sum_partial_gradients(params: list[torch.Tensor], summed: list[torch.Tensor], group: Any) -> None:
    """Sum over the tensor-parallel `group` the gradients that are partial there, in one all-reduce per dtype: those
    of `summed` (`summed_parameters`) and every `Partial` DTensor gradient (sequence-parallel norms: each rank's
    share of the positions), which become `Replicate`. Accumulated micro-batches are summed once, at the step."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    from torch.distributed.tensor import DTensor, Replicate

    wanted = {id(p) for p in summed}
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        partial = isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements)
        if partial:
            if any(pl.is_partial() and pl.reduce_op != "sum" for pl in grad.placements):
                raise ValueError(f"sum_partial_gradients: a gradient partial by {grad.placements}")
            placements = [Replicate() if pl.is_partial() else pl for pl in grad.placements]
            p.grad = DTensor.from_local(grad.to_local(), grad.device_mesh, placements, run_check=False)
        if partial or id(p) in wanted:
            local = _local(p.grad)
            by_dtype.setdefault(local.dtype, []).append(local)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` (DTensors sharded over any dimensions of the run's mesh, or plain) to the global
    2-norm `max_norm` (inf: measure only); returns the norm, a plain fp32 scalar equal on every rank.

    Each gradient's local sum of squares is added to the sum of the mesh dimensions it is sharded over, and each
    such sum is all-reduced over those dimensions only (a replicated dimension holds copies, counted once).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sums: dict[tuple[str, ...], torch.Tensor] = {}
    meshes: dict[tuple[str, ...], Any] = {}
    for grad in grads:
        dims: tuple[str, ...] = ()
        if isinstance(grad, DTensor):
            names = grad.device_mesh.mesh_dim_names or ()
            if any(placement.is_partial() for placement in grad.placements):
                raise ValueError("clip_grad_norm: a gradient holds unreduced partial sums")
            # Every placement but Replicate splits the tensor (Shard, and FSDP-over-TP's _StridedShard).
            dims = tuple(name for name, placement in zip(names, grad.placements) if not placement.is_replicate())
            meshes.setdefault(dims, grad.device_mesh)
        local = _local(grad).float()
        square = local.square().sum()
        sums[dims] = sums[dims] + square if dims in sums else square
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for dims in sorted(sums):  # the same order on every rank
        value = sums[dims]
        if dims:
            mesh = meshes[dims]
            group = mesh.get_group(dims[0]) if len(dims) == 1 else dist.group.WORLD
            if len(dims) > 1 and len(dims) != mesh.ndim:
                raise ValueError(f"clip_grad_norm: gradients sharded over {dims} of a {mesh.ndim}-D mesh")
            dist.all_reduce(value, group=group)
        total = total + value
    norm = total.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            local = _local(grad)
            groups.setdefault((local.device, local.dtype), []).append(local)
        for (dev, dtype), group_grads in groups.items():
            torch._foreach_mul_(group_grads, coef.to(device=dev, dtype=dtype))
    return norm
