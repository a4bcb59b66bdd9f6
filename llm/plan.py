"""Pre-flight planner: which parallel plan fits a model on N GPUs, and which of those is fastest.

    python -m llm.plan --model-preset llama-3.1-8b --gpus 8 --gpu-memory 80GB [--seq-len 4096] [--batch-size B]
        [--nodes K] [--precision bf16] [--optimizer muon|adamw]

For every candidate plan (DDP; FSDP; FSDP + tensor parallel T in {2, 4, 8} where T divides the attention and KV
heads and fits a node; on several nodes HSDP: sharded over one node's GPUs, replicated across the nodes;
activation checkpointing none/selective/full; micro-batch sizes) it predicts, per device,
the bytes of parameters, gradients, optimizer state and activations and the peak, and a step time; it prints the
table and the fastest plan that fits, as the training CLI's flags. Nothing is allocated: the model is built on the
meta device from its preset (`DecoderModel.from_preset`), and MoE presets count total and active parameters.

The memory model (per device; D = data-parallel degree, T = tensor-parallel degree, FSDP shards over D x T ranks):
- weights fp32 (master weights; bf16 runs compute in bf16 from them), gradients fp32, optimizer state fp32: AdamW
  2 moments per parameter, Muon 1 momentum per hidden matrix entry plus AdamW's 2 for the rest. DDP holds them
  whole plus its reducer's gradient buckets (a second fp32 copy of the gradients); FSDP divides all by D x T, HSDP
  by S (the GPUs of one node).
- transients: bf16 under DDP keeps autocast's bf16 copy of every weight saved for the backward (2 bytes each);
  FSDP holds the gathered compute-dtype weights of two blocks (the one running and the prefetched one), the root's
  (embeddings, head) and one block's unsharded fp32 gradients before the reduce-scatter; ShardedMuon holds one
  bucket of D x T (HSDP: S, each replica orthogonalises on its own) whole matrices (fp32 + bf16).
- activations, counted from `TransformerBlock`'s saved tensors (SDPA in a fused kernel: no T x T term): per token
  and layer, fp32: `4 * (4h + 3q + 2kv + 4i)` bytes (h hidden, q query width, kv key/value width, i MLP width);
  bf16 autocast: fp32 residual at the two norms, bf16 elsewhere, each of q/k/v and gate/up casting its input anew.
  `selective` keeps the block input and the matmul and attention outputs and recomputes the rest; `full` keeps
  the block input only; both re-create one block's activations during its backward. Plus the loss: the (B, T, V)
  logits in the compute dtype, their fp32 copy and log-softmax, and two fp32 gradients of that size. Tensor
  parallelism divides activations by T (sequence parallel norms and loss assumed).
- peak = weights + optimizer state + transients + max(activations + max(loss, one block re-created), gradients
  + one block re-created): the backward begins with every activation and ends with every gradient. The planner
  adds no margin for the allocator's fragmentation or the framework's buffers (say --gpu-memory net of them).
Checked against measured peaks of real training steps on the CPU (`benchmarks/bench_plan.py`, RESULTS.md "Planner
(issue 23)"): 1 process and 2-process FSDP, fp32 and bf16, checkpointing none and full, AdamW and Muon, all seven
within 5-9% under the measured peak.

Step time = compute + the communication that does not overlap it. Compute: the model's training FLOPs per token
(`llm.models.flops`, PaLM's 6N + attention) times the tokens of the micro-batch, plus recomputation (a forward, 1/3,
for `full`; 1/20 for `selective`'s cheap ops), at `--gpu-tflops` sustained per GPU (default 400: about 40% of an
H100's dense bf16 peak; 1/4 of it for fp32). Data-parallel communication (DDP's all-reduce, FSDP's all-gathers and
reduce-scatter, ShardedMuon's gather and broadcast) overlaps compute and counts where it exceeds it; tensor-parallel
all-reduces (4 per layer and step, forward and backward) are on the critical path. Bandwidths: `--intra-node-gbps`
(default 300 GB/s, NVLink bus bandwidth) inside a node, `--inter-node-gbps` (default 40 GB/s, 8 x 400 Gb/s
InfiniBand per node shared by its GPUs) across nodes. A ring moves 2(n-1)/n of the bytes per all-reduce, (n-1)/n
per all-gather or reduce-scatter. FSDP on several nodes runs its gathers and reduce-scatters over all D ranks at the
cross-node bandwidth; HSDP runs them over the S ranks of a node at the intra-node bandwidth and sends across nodes only
the all-reduce of each rank's 1/S gradient shard over the D / S replicas (and Muon's gather and broadcast stay inside
the node); the two parts are added (FSDP2 issues the all-reduce after the reduce-scatter).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from llm.errors import ConfigError, UserError

__all__ = ["Candidate", "ModelShape", "Plan", "candidates", "main", "model_shape", "parse_memory", "predict"]

GIB = 1024 ** 3
TP_DEGREES = (2, 4, 8)
AC_MODES = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
RECOMPUTE = {"none": 0.0, "selective": 0.05, "full": 1 / 3}  # extra compute, as a fraction of the step's FLOPs
PRECISIONS = ("bf16", "fp32")
OPTIMIZERS = ("muon", "adamw")
_UNITS = {"": GIB, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": GIB, "tib": 1024 ** 4, "k": 1024, "m": 1024 ** 2, "g": GIB,
          "t": 1024 ** 4}


def parse_memory(text: str) -> int:
    """Bytes of a memory spelling: `80GB` (10^9), `80GiB` / `80G` / `80` (2^30), `512MiB`, `1.5TB`."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = found.group(2).lower() if found else None
    if found is None or unit not in _UNITS or float(found.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory: {text!r} is not a memory size; write e.g. 80GB, 80GiB or 24576MiB")
    return int(float(found.group(1)) * _UNITS[unit])


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelShape:
    """What the memory and time models read from a model (built on the meta device)."""

    name: str
    params: int  # every parameter, tied ones once
    active_params: float  # those a token is multiplied by (llm.models.flops.active_parameters)
    muon_params: int  # the hidden matrices Muon updates (split_muon_params)
    block_params: int  # one block's parameters (the largest), an FSDP unit
    root_params: int  # parameters outside the blocks (embeddings, final norm, head)
    largest_matrix: int  # entries of the largest Muon matrix
    layers: int
    hidden: int
    q_width: int  # query heads x head dim
    kv_width: int  # key/value heads x head dim
    mlp_width: int  # per-token MLP activation width: intermediate size, or top_k x expert width (+ shared) for MoE
    vocab: int
    heads: int
    kv_heads: int
    flops_per_token: float  # training FLOPs per token at the planned sequence length
    moe: bool = False
    tp_params: int = 0  # parameters tensor parallelism splits (the blocks' matrices)


def model_shape(preset: str, seq_len: int, **overrides: Any) -> ModelShape:
    """Build `preset` (with ModelConfig `overrides`) on the meta device and measure what the planner needs (nothing
    is allocated)."""
    import torch

    from llm.models import flops
    from llm.models.decoder import DecoderModel
    from llm.training.optim.optimizers import split_muon_params

    with torch.device("meta"):
        model = DecoderModel.from_preset(preset, **{"max_seq_len": max(seq_len, 1), **overrides})
    c = model.config
    muon, _ = split_muon_params(model)
    blocks = list(model.layers)
    block_sizes = [flops.num_parameters(b) for b in blocks]
    total = flops.num_parameters(model)
    if c.use_moe:
        width = c.top_k * (c.moe_intermediate_size or c.intermediate_size) + c.num_shared_experts * (
            c.moe_intermediate_size or c.intermediate_size)
    else:
        width = c.intermediate_size
    tp = sum(p.numel() for b in blocks for p in b.parameters() if p.ndim >= 2)
    return ModelShape(
        name=preset, params=total, active_params=flops.active_parameters(model),
        muon_params=sum(p.numel() for p in muon), block_params=max(block_sizes),
        root_params=total - sum(block_sizes), largest_matrix=max((p.numel() for p in muon), default=0),
        layers=c.num_layers, hidden=c.hidden_size, q_width=c.num_heads * c.head_dim,
        kv_width=c.num_kv_heads * c.head_dim, mlp_width=width, vocab=c.vocab_size, heads=c.num_heads,
        kv_heads=c.num_kv_heads, flops_per_token=flops.flops_per_token(model, seq_len), moe=bool(c.use_moe),
        tp_params=tp,
    )


# ------------------------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Candidate:
    """One plan: strategy (ddp | fsdp | hsdp), tensor-parallel degree, activation checkpointing, micro-batch, and
    under hsdp the shard group's data-parallel ranks."""

    strategy: str
    tp: int
    ac: str
    batch: int
    shard: int = 0  # hsdp: the ranks each weight is sharded over (one node's GPUs); 0 otherwise

    @property
    def label(self) -> str:
        return self.strategy if self.tp == 1 else f"{self.strategy}+tp{self.tp}"


@dataclass
class Plan:
    """A candidate's prediction: bytes per device by part, the peak, the step time and throughput."""

    candidate: Candidate
    gpus: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    transient: float
    peak: float
    step_s: float
    tokens_per_s: float
    fits: bool
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def dp(self) -> int:
        return self.gpus // self.candidate.tp


def candidates(shape: ModelShape, gpus: int, nodes: int, batch: int | None) -> list[Candidate]:
    """Every plan to consider for `shape` on `gpus` GPUs over `nodes` nodes."""
    per_node = gpus // nodes
    layouts = [("ddp", 1, 0)]
    if gpus > 1:
        degrees = [1, *(t for t in TP_DEGREES
                        if t <= per_node and per_node % t == 0 and shape.heads % t == 0 and shape.kv_heads % t == 0)]
        layouts += [("fsdp", t, 0) for t in degrees]
        if nodes > 1 and per_node > 1:  # HSDP: shard over one node's GPUs, replicate across the nodes (no TP yet)
            layouts.append(("hsdp", 1, per_node))
    batches = (batch,) if batch else MICRO_BATCHES
    return [Candidate(s, t, ac, b, shard) for s, t, shard in layouts for ac in AC_MODES for b in batches]


# ------------------------------------------------------------------------------------------------ the models
def _activation_bytes(shape: ModelShape, precision: str, ac: str) -> tuple[float, float]:
    """(bytes kept per token for the whole stack, bytes one block re-creates during its backward) under `ac`."""
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.mlp_width
    lse = 4 * shape.heads  # SDPA's log-sum-exp, fp32
    if precision == "fp32":
        full = 4 * (4 * h + 3 * q + 2 * kv + 4 * i) + lse
        block_input, elem = 4 * h, 4
    else:  # bf16 autocast: fp32 residual into the norms, every matmul casting its input to bf16
        full = 4 * h + 2 * 3 * h + 2 * (2 * q + 2 * kv) + 2 * q + 4 * h + 2 * 2 * h + 2 * 4 * i + lse
        block_input, elem = 4 * h, 2
    if ac == "none":
        return shape.layers * full, 0.0
    if ac == "full":
        return shape.layers * block_input, float(full)
    kept = block_input + elem * (q + 2 * kv + h + 2 * i + h) + elem * q + lse  # matmul + attention outputs
    return shape.layers * kept, float(full)


def _loss_bytes(shape: ModelShape, precision: str) -> float:
    """Per token: logits in the compute dtype, their fp32 copy (bf16) and log-softmax, two fp32 gradients."""
    return shape.vocab * ((2 + 4) if precision == "bf16" else 4) + shape.vocab * 4 + shape.vocab * 8


def predict(shape: ModelShape, cand: Candidate, gpus: int, nodes: int, memory: int, seq_len: int,
            precision: str = "bf16", optimizer: str = "muon", gpu_tflops: float = 400.0,
            intra_gbps: float = 300.0, inter_gbps: float = 40.0) -> Plan:
    """The prediction for one candidate (see the module docstring for the model)."""
    t = cand.tp
    shards = {"fsdp": gpus, "hsdp": cand.shard * t}.get(cand.strategy, 1)  # ranks one weight is spread over
    P = shape.params
    # tensor parallelism splits the blocks' matrices T ways; FSDP then shards what each rank holds over the rest
    held = (P - shape.tp_params + shape.tp_params / t) / (shards / t) if cand.strategy != "ddp" else P
    weights = 4 * held
    grads = 4 * held
    muon_fraction = shape.muon_params / P if optimizer == "muon" else 0.0
    optim = held * (4 * muon_fraction + 8 * (1 - muon_fraction))
    compute_bytes = 2 if precision == "bf16" else 4
    tokens = cand.batch * seq_len
    kept, recreated = _activation_bytes(shape, precision, cand.ac)
    activations = tokens * kept / t
    loss = tokens * _loss_bytes(shape, precision) / t
    parts: dict[str, float] = {"loss": loss, "recompute": tokens * recreated / t}
    if cand.strategy == "ddp":
        parts["ddp_buckets"] = 4 * P if gpus > 1 else 0.0
        parts["autocast_weights"] = 2 * P if precision == "bf16" else 0.0
        opt_transient = 6 * shape.largest_matrix if optimizer == "muon" else 0.0
    else:
        unit = shape.block_params / t
        parts["gathered_weights"] = (2 * unit + shape.root_params) * compute_bytes
        parts["unit_grads"] = 4 * unit
        opt_transient = 6 * shape.largest_matrix * shards if optimizer == "muon" else 0.0
    transient = sum(v for k, v in parts.items() if k not in ("loss", "recompute"))
    # Backward starts with every kept activation and the loss's buffers (then a checkpointed block's re-created
    # ones) and ends with every gradient while the first block's activations are re-created; peak at either end.
    recompute = parts["recompute"]
    peak = weights + optim + transient + max(activations + max(loss, recompute), grads + recompute + opt_transient)
    # -- time
    flops = shape.flops_per_token * tokens * (1 + RECOMPUTE[cand.ac]) / t
    tflops = gpu_tflops if precision == "bf16" else gpu_tflops / 4
    compute_s = flops / (tflops * 1e12)
    dp = gpus // t
    bw_dp = (inter_gbps if nodes > 1 else intra_gbps) * 1e9
    if dp > 1 and cand.strategy == "ddp":
        dp_bytes = 2 * (dp - 1) / dp * 4 * P
    elif dp > 1 or shards > 1:
        n = shards if cand.strategy == "fsdp" else cand.shard
        per_rank = (P - shape.tp_params + shape.tp_params / t)
        dp_bytes = (n - 1) / n * per_rank * (2 * compute_bytes + 4)  # 2 all-gathers (fwd, bwd) + reduce-scatter
        if optimizer == "muon":
            dp_bytes += (n - 1) / n * shape.muon_params * 4 + shape.muon_params * 2  # gather + bf16 broadcast
    else:
        dp_bytes = 0.0
    dp_s = dp_bytes / bw_dp
    if cand.strategy == "hsdp":  # the shard group inside a node; across nodes the all-reduce of a 1/S gradient shard
        replicas = dp // cand.shard
        cross = 2 * (replicas - 1) / replicas * 4 * per_rank / cand.shard
        dp_s = dp_bytes / (intra_gbps * 1e9) + cross / (inter_gbps * 1e9)
    tp_s = 0.0
    if t > 1:
        tp_bytes = 4 * shape.layers * 2 * (t - 1) / t * tokens * shape.hidden * compute_bytes
        tp_s = tp_bytes / (intra_gbps * 1e9)
    step_s = max(compute_s, dp_s) + tp_s
    tokens_per_s = tokens * dp / step_s if step_s > 0 else 0.0
    return Plan(cand, gpus, weights, grads, optim, activations, transient + opt_transient, peak, step_s,
                tokens_per_s, peak <= memory, parts)


# ------------------------------------------------------------------------------------------------ the CLI
def flags(plan: Plan, preset: str, seq_len: int, precision: str, optimizer: str) -> list[str]:
    """The training CLI's flags for `plan` (the per-process ones; the launcher sets the process count)."""
    c = plan.candidate
    out = ["--task", "lm", "--model-preset", preset, "--data-seq-len", str(seq_len)]
    if plan.gpus > 1:
        out += ["--distributed-strategy", c.strategy]
    if c.strategy == "hsdp":
        out += ["--distributed-shard-size", str(c.shard)]
    if c.tp > 1:
        out += ["--distributed-tensor-parallel", str(c.tp)]
    out += ["--training-activation-checkpointing", c.ac, "--training-batch-size", str(c.batch),
            "--training-precision", precision, "--training-optimizer", optimizer]
    return out


def command(plan: Plan, nodes: int, flag_list: list[str]) -> str:
    """The launch line: the CLI spawning the local processes, or torchrun on each node."""
    per_node = plan.gpus // nodes
    if nodes == 1:
        spawn = ["--distributed-nproc-per-node", str(per_node)] if per_node > 1 else []
        return " ".join(["python -m llm.training.train", *flag_list, *spawn])
    return " ".join([f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
                     "--rdzv-endpoint HOST:29500 -m llm.training.train", *flag_list])


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def table(plans: list[Plan]) -> str:
    """One line per plan: bytes per device by part (GiB), the peak, step time, throughput, whether it fits."""
    head = (f"{'plan':10} {'ac':9} {'mb':>3} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} "
            f"{'transient':>9} {'peak GiB':>9} {'step s':>8} {'tokens/s':>10} fits")
    lines = [head, "-" * len(head)]
    for p in plans:
        c = p.candidate
        lines.append(f"{c.label:10} {c.ac:9} {c.batch:>3} {_gib(p.weights):>8} {_gib(p.grads):>8} "
                     f"{_gib(p.optimizer):>8} {_gib(p.activations):>8} {_gib(p.transient):>9} {_gib(p.peak):>9} "
                     f"{p.step_s:>8.3f} {p.tokens_per_s:>10,.0f} {'yes' if p.fits else 'no'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The planner's flags."""
    parser = _Parser(
        prog="python -m llm.plan", description="Predict memory per GPU and step time of the parallel plans for a "
        "model preset, and print the fastest plan that fits as training flags.")
    parser.add_argument("--model-preset", required=True, help="a preset of llm.models.presets (e.g. llama-3.1-8b)")
    parser.add_argument("--gpus", required=True, type=int, help="GPUs in all (over all nodes)")
    parser.add_argument("--gpu-memory", required=True, help="memory per GPU usable for training: 80GB, 80GiB, ...")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's "
                        "max_seq_len, at most 4096)")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch per data-parallel rank "
                        f"(default: try {', '.join(map(str, MICRO_BATCHES))})")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (default 1)")
    parser.add_argument("--precision", default="bf16", help="bf16 | fp32 (default bf16)")
    parser.add_argument("--optimizer", default="muon", help="muon | adamw (default muon, the lm task's)")
    parser.add_argument("--gpu-tflops", type=float, default=400.0, help="sustained bf16 TFLOPS per GPU (default "
                        "400: ~40%% of an H100's dense peak)")
    parser.add_argument("--intra-node-gbps", type=float, default=300.0, help="GB/s between GPUs of a node")
    parser.add_argument("--inter-node-gbps", type=float, default=40.0, help="GB/s per GPU across nodes")
    parser.add_argument("--all", action="store_true", help="print every candidate, not only the best per plan")
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing flag, `--gpus x`) as the project's one-line user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"python -m llm.plan: {message}")


def _checked(args: argparse.Namespace) -> tuple[int, int]:
    """Validate the arguments: (bytes per GPU, sequence length)."""
    from llm.models.presets import PRESETS

    if args.model_preset not in PRESETS:
        from llm.errors import did_you_mean

        raise ConfigError(f"--model-preset: unknown preset {args.model_preset!r}"
                          f"{did_you_mean(args.model_preset, PRESETS)}")
    if args.gpus < 1:
        raise ConfigError(f"--gpus: {args.gpus} must be >= 1")
    if args.nodes < 1 or args.gpus % args.nodes:
        raise ConfigError(f"--nodes: {args.nodes} must be >= 1 and divide --gpus {args.gpus}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: {args.batch_size} must be >= 1")
    if args.precision not in PRECISIONS:
        raise ConfigError(f"--precision: {args.precision!r} must be one of {', '.join(PRECISIONS)}")
    if args.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer: {args.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
    for name in ("gpu_tflops", "intra_node_gbps", "inter_node_gbps"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be > 0")
    memory = parse_memory(args.gpu_memory)
    seq_len = args.seq_len if args.seq_len is not None else min(PRESETS[args.model_preset].fields.get(
        "max_seq_len", 2048), 4096)
    if seq_len < 1:
        raise ConfigError(f"--seq-len: {seq_len} must be >= 1")
    return memory, seq_len


def plan_all(args: argparse.Namespace) -> tuple[ModelShape, list[Plan], int, int]:
    """(the model's shape, every candidate's prediction, bytes per GPU, sequence length) for parsed `args`."""
    memory, seq_len = _checked(args)
    shape = model_shape(args.model_preset, seq_len)
    plans = [predict(shape, c, args.gpus, args.nodes, memory, seq_len, args.precision, args.optimizer,
                     args.gpu_tflops, args.intra_node_gbps, args.inter_node_gbps)
             for c in candidates(shape, args.gpus, args.nodes, args.batch_size)]
    return shape, plans, memory, seq_len


def _shown(plans: list[Plan], every: bool) -> list[Plan]:
    """Every plan, or per (layout, ac) the largest micro-batch that fits (else the smallest)."""
    if every:
        return plans
    best: dict[tuple[str, str], Plan] = {}
    for p in plans:
        key = (p.candidate.label, p.candidate.ac)
        old = best.get(key)
        if old is None or (p.fits and (not old.fits or p.tokens_per_s > old.tokens_per_s)):
            best[key] = p
    return list(best.values())


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 with a plan that fits, 1 when none does, 2 on bad input (one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        shape, plans, memory, seq_len = plan_all(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    active = f", {shape.active_params / 1e9:.2f}B active per token" if shape.moe else ""
    print(f"{shape.name}: {shape.params / 1e9:.3f}B parameters{active}; {args.gpus} GPU(s) on {args.nodes} "
          f"node(s), {memory / GIB:.1f} GiB each; seq {seq_len}, {args.precision}, {args.optimizer}")
    print(f"assumed: {args.gpu_tflops:g} TFLOPS sustained per GPU (bf16; fp32 a quarter), {args.intra_node_gbps:g} "
          f"GB/s in a node, {args.inter_node_gbps:g} GB/s per GPU across nodes; memory per GPU in GiB")
    print(table(_shown(plans, args.all)))
    fitting = [p for p in plans if p.fits]
    if not fitting:
        smallest = min(plans, key=lambda p: p.peak)
        print(f"\nno plan fits {memory / GIB:.1f} GiB per GPU: the smallest peak is {_gib(smallest.peak)} GiB "
              f"({smallest.candidate.label}, {smallest.candidate.ac}, micro-batch {smallest.candidate.batch}); "
              "add GPUs or shorten --seq-len")
        return 1
    best = max(fitting, key=lambda p: (p.tokens_per_s, -p.peak))
    flag_list = flags(best, args.model_preset, seq_len, args.precision, args.optimizer)
    print(f"\nfastest plan that fits: {best.candidate.label}, activation checkpointing {best.candidate.ac}, "
          f"micro-batch {best.candidate.batch}: peak {_gib(best.peak)} GiB per GPU, ~{best.step_s:.3f} s per step, "
          f"~{best.tokens_per_s:,.0f} tokens/s")
    print("flags: " + " ".join(flag_list))
    print("run:   " + command(best, args.nodes, flag_list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
