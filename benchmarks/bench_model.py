"""Side-by-side training throughput of our models against Hugging Face transformers (a benchmark, not a test).

    python -m benchmarks.bench_model [--quick] [--sections equal fast layer fallback] [--threads N] [--json out.json]

Sections, each alternating the contenders step by step in one process (so machine load hits both alike) and
reporting medians (and minima) of per-step wall time:
- ``equal``: one training step (forward, cross-entropy on the full logits, backward, AdamW) in eager fp32 at
  each library's defaults: DecoderModel vs ``LlamaForCausalLM`` (sdpa), MoE DecoderModel vs
  ``MixtralForCausalLM`` (its default experts implementation, router aux loss on). Same weights on both sides.
- ``fast``: each side at its fastest setting that trains correctly: a short calibration times every candidate
  (precision fp32 / bf16 autocast; ours: full logits or chunked linear+CE, MoE dispatch loop or grouped_mm;
  HF: experts implementation eager / grouped_mm), then the two winners are alternated.
- ``layer``: a fine-grained MoE layer (64 experts, top-8, width 128), forward + backward: our MoELayer vs HF's
  ``MixtralSparseMoeBlock`` with its per-expert loop (``eager``) and with ``grouped_mm``.
- ``fallback``: the MoE dispatch paths for where ``grouped_mm`` cannot run, fp32: the loop of mm's against the
  sync-free padded blocks (``dispatch="padded"``), with ``grouped_mm`` for reference.
Model config: presets ``bench-256`` / ``bench-256-moe`` (hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 8192,
SwiGLU width 688; MoE: 8 experts of width 688, top-2), seq 256, batch 8.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from llm.models import DecoderModel, MoELayer
from llm.models.hf import _config_from_hf, _state_dict_from_hf
from llm.models.loss import linear_cross_entropy
from llm.models.presets import get_preset

# The model shapes are presets (llm/models/presets.py: bench-256 and bench-256-moe, parameter counts tested); the HF
# side is configured from the same values, so the two cannot drift apart.
_SHAPE = get_preset("bench-256-moe").fields
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, WIDTH = (_SHAPE[k] for k in (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"))
EXPERTS, TOP_K = _SHAPE["num_experts"], _SHAPE["top_k"]
SEQ, BATCH = _SHAPE["max_seq_len"], 8
LAYER_CFG = dict(hidden=256, experts=64, top_k=8, width=128, tokens=BATCH * SEQ)
MIXTRAL_AUX_COEF = 0.02  # HF's router_aux_loss_coef default

Step = Callable[[], float]
# Wall time by default; `--clock cpu` uses this process's CPU time, which on a shared machine (other jobs
# competing for the cores) leaves out the time the benchmark sat descheduled. With 1 thread it equals wall time
# on an idle machine; with more threads it also counts OpenMP spin-waiting.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


# ------------------------------------------------------------------------------------------------ model pairs
def build_hf(moe: bool, experts_impl: str | None = None) -> torch.nn.Module:
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=WIDTH, max_position_embeddings=SEQ)
    if moe:
        cfg = transformers.MixtralConfig(**common, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                         output_router_logits=True, router_aux_loss_coef=MIXTRAL_AUX_COEF)
        kwargs = {"experts_implementation": experts_impl} if experts_impl else {}
        return transformers.MixtralForCausalLM._from_config(cfg, attn_implementation="sdpa", **kwargs)
    return transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**common), attn_implementation="sdpa")


def ours_from_hf(hf: torch.nn.Module, **overrides: Any) -> DecoderModel:
    """Our model with exactly the HF model's weights (so MoE routing, hence work per expert, is identical)."""
    hf_cfg = hf.config.to_dict() | {"architectures": [type(hf).__name__]}
    cfg = _config_from_hf(hf_cfg)
    state = _state_dict_from_hf({k: v.detach().clone() for k, v in hf.state_dict().items()}, cfg)
    model = DecoderModel.from_state_dict(state, **cfg)
    for m in model.modules():
        if isinstance(m, MoELayer):
            for k, v in overrides.items():
                setattr(m, k, v)
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours_step(model: DecoderModel, precision: str = "fp32", loss: str = "logits") -> Step:
    """One optimizer step of our model; returns the loss (checked finite)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch()

    def step() -> float:
        with _autocast(precision):
            if loss == "chunked":
                out = linear_cross_entropy(model(x, return_hidden=True), model.lm_head.weight, y, chunk_size=512)
            else:
                out = F.cross_entropy(model(x).float().view(-1, VOCAB), y.reshape(-1))
            aux = model.aux_loss
            if aux is not None:
                out = out + aux
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.item()

    return step


def hf_step(model: torch.nn.Module, precision: str = "fp32") -> Step:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch()
    coef = getattr(model.config, "router_aux_loss_coef", 0.0)

    def step() -> float:
        with _autocast(precision):
            res = model(input_ids=x)
            out = F.cross_entropy(res.logits.float().view(-1, VOCAB), y.reshape(-1))
            if getattr(res, "aux_loss", None) is not None:
                out = out + coef * res.aux_loss
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.item()

    return step


# ---------------------------------------------------------------------------------------------------- timing
def alternate(steps: dict[str, Step], iters: int, warmup: int) -> dict[str, list[float]]:
    """Per-step times (see ``clock``), contenders interleaved (order rotated every round)."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        for n in names[i % len(names):] + names[: i % len(names)]:
            t0 = clock()
            loss = steps[n]()
            times[n].append(clock() - t0)
            if loss != loss or abs(loss) == float("inf"):  # NaN/inf: that setting does not train correctly
                raise RuntimeError(f"{n}: non-finite loss {loss}")
    return times


def calibrate(candidates: dict[str, Callable[[], Step]], rounds: int) -> str:
    """Fastest candidate: all built, alternated round-robin (so load drifts hit all alike), lowest median wins."""
    steps = {}
    for name, make in candidates.items():
        try:
            steps[name] = make()
            steps[name]()
        except Exception as e:  # a setting that fails here is simply not a candidate
            print(f"  {name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            steps.pop(name, None)
    times = alternate(steps, rounds, warmup=0)
    med = {n: statistics.median(t) for n, t in times.items()}
    for n in steps:
        print(f"  {n:<44} median {med[n] * 1e3:7.0f} ms  min {min(times[n]) * 1e3:7.0f} ms")
    return min(med, key=med.__getitem__)


def summarize(title: str, times: dict[str, list[float]], ours: str, rows: list[dict[str, Any]], unit: str,
              label: str = "ours") -> None:
    """Print medians/minima; ratios are each contender's time over ``ours``'s (called ``label`` in the text)."""
    med = {n: statistics.median(t) for n, t in times.items()}
    best = {n: min(t) for n, t in times.items()}
    print(f"\n{title}")
    for n in times:
        ratio = f"  {label} {med[n] / med[ours]:.2f}x faster (median), {best[n] / best[ours]:.2f}x (min)"
        ratio = "" if n == ours else ratio
        print(f"  {n:<40} median {med[n] * 1e3:8.1f} ms  min {best[n] * 1e3:8.1f} ms{ratio}")
        rows.append(dict(section=title, name=n, median_ms=med[n] * 1e3, min_ms=best[n] * 1e3, unit=unit,
                         speedup_median=med[n] / med[ours], speedup_min=best[n] / best[ours], n=len(times[n])))


# -------------------------------------------------------------------------------------------------- sections
def section_equal(iters: int, rows: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    hf = build_hf(moe=False)
    ours = ours_from_hf(hf)
    times = alternate({"ours dense (fp32 eager)": ours_step(ours), "HF Llama (fp32 eager, sdpa)": hf_step(hf)},
                      iters, warmup=2)
    summarize("equal settings: dense train step", times, "ours dense (fp32 eager)", rows, "step")
    torch.manual_seed(0)
    hf = build_hf(moe=True)
    ours = ours_from_hf(hf)
    impl = hf.config._experts_implementation
    steps = {"ours MoE (fp32 eager)": ours_step(ours), f"HF Mixtral (fp32 eager, experts={impl})": hf_step(hf)}
    times = alternate(steps, iters, warmup=2)
    summarize("equal settings: MoE train step", times, "ours MoE (fp32 eager)", rows, "step")


def fast_candidates(moe: bool, base: torch.nn.Module) -> tuple[dict[str, Callable[[], Step]], dict[str, Any]]:
    """Every setting each side may use, as step factories (built lazily: one model alive at a time)."""
    kind = "MoE" if moe else "dense"

    def make_ours(prec: str, loss: str, overrides: dict[str, Any]) -> Step:
        return ours_step(ours_from_hf(base, **overrides), prec, loss)

    ours: dict[str, Callable[[], Step]] = {}
    for prec in ("fp32", "bf16"):
        for loss in ("logits", "chunked"):
            for d in ("loop", "grouped_mm") if moe else (None,):
                name = f"ours {kind} {prec} {loss}" + (f" dispatch={d}" if d else "")
                over = {"dispatch": d} if d else {}
                ours[name] = functools.partial(make_ours, prec, loss, over)

    def make_hf(prec: str, impl: str | None) -> Step:
        model = build_hf(moe, impl)
        model.load_state_dict(base.state_dict())
        return hf_step(model, prec)

    hf: dict[str, Callable[[], Step]] = {}
    for prec in ("fp32", "bf16"):
        # batched_mm is left out: it gathers a weight copy per routed token, 5.8 GB per layer at these sizes.
        for impl in ("eager", "grouped_mm") if moe else (None,):
            name = f"HF {'Mixtral' if moe else 'Llama'} {prec}" + (f" experts={impl}" if impl else "")
            hf[name] = functools.partial(make_hf, prec, impl)
    return ours, hf


def section_fast(iters: int, calib: int, rows: list[dict[str, Any]]) -> None:
    for moe in (False, True):
        kind = "MoE" if moe else "dense"
        torch.manual_seed(0)
        ours_c, hf_c = fast_candidates(moe, build_hf(moe))
        print(f"\ncalibrating {kind} ({calib} interleaved rounds)")
        best_ours = calibrate(ours_c, calib)
        best_hf = calibrate(hf_c, calib)
        times = alternate({best_ours: ours_c[best_ours](), best_hf: hf_c[best_hf]()}, iters, warmup=1)
        summarize(f"fastest settings: {kind} train step", times, best_ours, rows, "step")


def section_layer(iters: int, rows: list[dict[str, Any]]) -> None:
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = LAYER_CFG
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=c["hidden"], intermediate_size=c["width"],
                                     num_local_experts=c["experts"], num_experts_per_tok=c["top_k"])
    blocks = {}
    for impl in ("eager", "grouped_mm"):
        cfg_i = transformers.MixtralConfig(**cfg.to_dict())
        cfg_i._experts_implementation = impl
        blocks[impl] = MixtralSparseMoeBlock(cfg_i)
        torch.nn.init.normal_(blocks[impl].gate.weight, std=0.02)
        torch.nn.init.normal_(blocks[impl].experts.gate_up_proj, std=0.02)
        torch.nn.init.normal_(blocks[impl].experts.down_proj, std=0.02)
    blocks["grouped_mm"].load_state_dict(blocks["eager"].state_dict())
    ours = MoELayer(c["hidden"], c["experts"], c["top_k"], c["width"])
    with torch.no_grad():
        ours.gate.weight.copy_(blocks["eager"].gate.weight)
        ours.w_gate_up.copy_(blocks["eager"].experts.gate_up_proj.transpose(1, 2))
        ours.w_down.copy_(blocks["eager"].experts.down_proj.transpose(1, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, SEQ, c["hidden"], generator=g)
    grad = torch.randn(BATCH, SEQ, c["hidden"], generator=g)
    torch.testing.assert_close(ours(x), blocks["eager"](x), atol=1e-5, rtol=1e-4)  # same function

    def fwd_bwd(layer: torch.nn.Module, dtype: torch.dtype) -> Step:
        xd, gd = x.to(dtype), grad.to(dtype)

        def step() -> float:
            xi = xd.clone().requires_grad_()
            out = layer(xi)
            (out * gd).sum().backward()
            layer.zero_grad(set_to_none=True)
            return 0.0

        return step

    # fp32: everything as built. bf16: weights and activations in bf16 on every side (HF's grouped_mm path
    # ignores autocast, so pure bf16 is the setting in which all three run their expert GEMMs in bf16).
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        layers = {"ours MoELayer": ours} | {f"HF MixtralSparseMoeBlock experts={i}": b for i, b in blocks.items()}
        for m in layers.values():
            m.to(dtype)
        dispatch = "grouped_mm" if ours._use_grouped_mm(x.to(dtype)) else "loop"
        steps = {f"{n}{f' (dispatch={dispatch})' if n.startswith('ours') else ''} {label}": fwd_bwd(m, dtype)
                 for n, m in layers.items()}
        times = alternate(steps, iters, warmup=2)
        title = f"MoE layer 64 experts top-8 width 128, 2048 tokens, fwd+bwd, {label}"
        summarize(title, times, next(iter(steps)), rows, "fwd+bwd")


def section_dispatch(iters: int, rows: list[dict[str, Any]]) -> None:
    """Our two expert-matmul paths on this machine: torch._grouped_mm vs the loop of mm's, per dtype and shape."""
    shapes = {"MoE model layer (8 experts, top-2, width 688)": (HIDDEN, EXPERTS, TOP_K, WIDTH),
              "fine-grained (64 experts, top-8, width 128)": (LAYER_CFG["hidden"], LAYER_CFG["experts"],
                                                              LAYER_CFG["top_k"], LAYER_CFG["width"])}
    for title, (h, e, k, w) in shapes.items():
        for prec in ("fp32", "bf16"):
            torch.manual_seed(0)
            layers = {d: MoELayer(h, e, k, w, dispatch=d) for d in ("loop", "grouped_mm")}
            layers["grouped_mm"].load_state_dict(layers["loop"].state_dict())
            x = torch.randn(BATCH * SEQ, h)

            def fwd_bwd(layer: MoELayer, p: str = prec, x: torch.Tensor = x) -> Step:
                def step() -> float:
                    with _autocast(p):
                        layer(x.clone().requires_grad_()).sum().backward()
                    layer.zero_grad(set_to_none=True)
                    return 0.0

                return step

            times = alternate({f"dispatch={d} {prec}": fwd_bwd(m) for d, m in layers.items()}, iters, warmup=2)
            summarize(f"dispatch: {title}, {prec}, fwd+bwd", times, f"dispatch=loop {prec}", rows, "fwd+bwd",
                      label="loop")


def section_fallback(iters: int, rows: list[dict[str, Any]]) -> None:
    """The paths for where grouped_mm cannot run, fp32 fwd+bwd, 4096 tokens: the loop of mm's (reads the group sizes
    on the host) vs the padded block bmm (sync-free), grouped_mm for reference; for the 8-expert hidden-256 layer
    also both compiled with inductor (the loop behind its graph breaks, padded as one graph; minutes to compile)."""
    shapes = {"8 experts, top-2, hidden 128, width 352": (128, 8, 2, 352),
              "8 experts, top-2, hidden 256, width 688": (256, 8, 2, 688),
              "64 experts, top-8, hidden 256, width 128": (256, 64, 8, 128)}
    for title, (h, e, k, w) in shapes.items():
        torch.manual_seed(0)
        layers = {d: MoELayer(h, e, k, w, dispatch=d) for d in ("loop", "padded", "grouped_mm")}
        for layer in layers.values():
            layer.load_state_dict(layers["loop"].state_dict())
        x = torch.randn(4096, h)

        def fwd_bwd(layer: MoELayer, run: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    x: torch.Tensor = x) -> Step:
            def step() -> float:
                (layer if run is None else run)(x.clone().requires_grad_()).sum().backward()
                layer.zero_grad(set_to_none=True)
                return 0.0

            return step

        steps = {f"dispatch={d}": fwd_bwd(m) for d, m in layers.items()}
        if h == 256 and e == 8:
            for d in ("loop", "padded"):
                steps[f"dispatch={d} compiled"] = fwd_bwd(layers[d], torch.compile(layers[d]))
        times = alternate(steps, iters, warmup=2)
        summarize(f"fallback: {title}, fp32, fwd+bwd", times, "dispatch=loop", rows, "fwd+bwd", label="loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    sections = ["equal", "fast", "layer", "dispatch", "fallback"]
    parser.add_argument("--sections", nargs="+", default=sections, choices=sections)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or process CPU time")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    iters, calib = (3, 2) if args.quick else (15, 4)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"load average {os.getloadavg()}")
    rows: list[dict[str, Any]] = []
    if "equal" in args.sections:
        section_equal(iters, rows)
    if "fast" in args.sections:
        section_fast(iters, calib, rows)
    if "layer" in args.sections:
        section_layer(iters * 2, rows)
    if "dispatch" in args.sections:
        section_dispatch(iters, rows)
    if "fallback" in args.sections:
        section_fallback(iters, rows)
    print(f"\nload average at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
