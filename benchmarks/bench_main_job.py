"""The main job against its peer: our default `lm` run vs the Hugging Face Trainer + LlamaForCausalLM of the same
shape on the same data (a benchmark, not a test).

    python -m benchmarks.bench_main_job [--max-steps N] [--val-interval N] [--target-bpb X] [--sides ours hf]
                                        [--peer hf|hf-muon] [--json out.json] [--breakdown DIR]
                                        [-- our training flags ...]
    python -m benchmarks.bench_main_job --step-ab ROUNDS [-- our training flags ...]

Side A ("ours") is `python -m llm.training.train --task lm` exactly as `make train` runs it, plus any flags given after
`--` (e.g. `-- --training-optimizer muon`). Side B ("hf") is a `transformers.Trainer` training a `LlamaForCausalLM`
built from our resolved config: vocab, hidden, layers, heads, KV heads, SwiGLU width, rope theta, RMSNorm eps, tied
embeddings or not. Both sides get:
- exactly the same training windows in the same order (side B iterates our `TextDataModule`'s train loader, which
  the engine also reads: one seeded permutation per epoch) and the same validation windows (our val loader, capped
  at `training.val_max_batches` like the engine's validation);
- the same batch, peak lr, warmup and decay to `min_lr_ratio` (cosine: HF `cosine_with_min_lr`; WSD: HF
  `warmup_stable_decay` with our decay steps and shape), weight decay, Adam
  betas, gradient clipping, bf16 autocast (when our `precision` resolves to bf16), seed and one intra-op thread;
- validation every `training.val_interval` steps and at the end, scored with our `bits_per_byte` helper.
Known differences, the peers' own conventions: HF's warmup starts from lr 0 (ours from lr/warmup), HF decays the
embedding table (we decay matrices except embeddings), and each side initialises its weights its own way.

Side "hf-muon" (`--peer hf-muon`, issue 24) is the stronger peer: an HF user who copies our recipe. The same Trainer
and model (`Qwen3ForCausalLM` where our model has `qk_norm`), with `torch.optim.Muon` on the same hidden matrices as
ours (the 2-D weights of the decoder layers) at `lr * muon_lr_scale`, RMS-matched to AdamW
(`adjust_lr_fn="match_rms_adamw"`, our `training.muon_*` options), and AdamW on the rest at `lr` (times
`training.adamw_lr_scale`), decayed as the Trainer decays (`Trainer.get_decay_parameter_names`: every weight but
biases and norms); both follow the Trainer's one schedule (the two optimizers are stepped as one, through our
`CompositeOptimizer`: plumbing, not a recipe choice). Steps, batch, warmup, cosine floor and validation as above,
so with no flags it runs our default steps (1,100 since issue 24's third sweep). The peer keeps the embedding table
on AdamW, as the issue defines it, where our lm default has put it on Muon since issue 24
(`training.muon_embeddings`): a choice an HF user could copy, so what it gains is a recipe lead, not a framework
one. It follows our shape, heads included.

Each side runs as its own process, back to back, and is timed from launch to exit (import, data, model, training,
validations, our sampling and saving: the whole run a user waits for). Each side's validation lines are time-stamped
as they arrive, which gives the "time to reach bpb X" readout (X defaults to side B's final bpb).

`--breakdown DIR` (issue 24, step cost) runs each side under `cProfile` with a CPU-time clock
(`time.process_time`: proportions that hold on a loaded machine, where wall seconds do not) and prints where each
side's CPU seconds went: training steps (per step), validation (per validation), our sample generation, the final
saves, and the rest (imports, data, model, start-up). The profiles stay in DIR (`ours.prof`, `hf-muon.prof`; read
them with `python -m pstats`). cProfile's own cost inflates Python-heavy parts (sampling most): compare like with
like, and time a suspect without the profiler before acting on it. `--step-ab ROUNDS` is the unprofiled check of
the training step alone (see `step_ab`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Our console logger's validation line, e.g. "12:00:00 INFO step 750 val/loss=1.2 val/bpb=1.74 val/ppl=3.3".
OUR_VAL = re.compile(r"step (\d+)\b.*\bval/bpb=([0-9.]+)")
HF_VAL = re.compile(r"^HF-EVAL step=(\d+) bpb=([0-9.]+)")


# ------------------------------------------------------------------------------------------------ the two sides
def our_argv(flags: list[str], log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "llm.training.train", "--task", "lm", *flags, "--logging-log-dir", str(log_dir)]


def hf_argv(flags: list[str], side: str = "hf") -> list[str]:
    return [sys.executable, "-m", "benchmarks.bench_main_job", "--worker", side, "--", *flags]


def profiled_argv(argv: list[str], out: Path) -> list[str]:
    """`argv` (python -m MODULE ARGS) run under cProfile with a CPU-time clock, the stats dumped to `out`."""
    module, args = argv[2], argv[3:]
    code = ("import cProfile, runpy, sys, time\n"
            f"sys.argv = {[module, *args]!r}\n"
            "p = cProfile.Profile(time.process_time)\n"
            "p.enable()\n"
            "try:\n    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
            "finally:\n"
            f"    p.disable(); p.dump_stats({str(out)!r})\n")
    return [argv[0], "-c", code]


# (label, [(path suffix, function)] whose cumulative CPU seconds add up, ... minus [...]) per side; "steps" and
# "validations" divide the row by the side's count. The rest of the profile's total is start-up and everything else.
BREAKDOWN: dict[str, list[tuple[str, list[tuple[str, str]], list[tuple[str, str]]]]] = {
    "ours": [
        ("training steps", [("core/engine.py", "_fit")], [("core/engine.py", "validate")]),
        ("validation forwards", [("core/engine.py", "validate")], [("tasks/lm_task.py", "sample")]),
        ("sample generation", [("tasks/lm_task.py", "sample")], []),
        ("final saves", [("core/engine.py", "_save_final")], []),
    ],
    "hf": [
        ("training steps", [("transformers/trainer.py", "_inner_training_loop")],
         [("transformers/trainer.py", "evaluate")]),
        ("validation forwards", [("transformers/trainer.py", "evaluate")], []),
    ],
}


def breakdown(prof: Path, side: str, steps: int, validations: int) -> list[tuple[str, float, str]]:
    """(what, CPU seconds, per unit) rows of one side's profile."""
    import pstats

    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]

    def cum(path: str, func: str) -> float:
        return max((v[3] for (f, _, name), v in stats.items() if f.endswith(path) and name == func), default=0.0)

    total = max(v[3] for v in stats.values())
    rows, accounted = [], 0.0
    for label, plus, minus in BREAKDOWN["ours" if side == "ours" else "hf"]:
        seconds = sum(cum(*k) for k in plus) - sum(cum(*k) for k in minus)
        accounted += seconds
        unit = {"training steps": f"{seconds / max(steps, 1):.3f} s/step",
                "validation forwards": f"{seconds / max(validations, 1):.2f} s/validation"}.get(label, "")
        rows.append((label, seconds, unit))
    rows.append(("start-up and the rest", total - accounted, ""))
    rows.append(("total", total, ""))
    return rows


def timed_run(name: str, argv: list[str], pattern: re.Pattern[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one side to completion; its wall time from launch to exit and its (elapsed s, step, bpb) val points."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    curve, tail = [], []
    assert proc.stdout is not None
    for line in proc.stdout:
        match = pattern.search(line)
        if match:
            curve.append((time.perf_counter() - start, int(match.group(1)), float(match.group(2))))
            print(f"  [{name}] {time.perf_counter() - start:7.1f}s step {match.group(1)} val/bpb={match.group(2)}",
                  flush=True)
        tail = (tail + [line])[-30:]
    wall = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{''.join(tail)}")
    if not curve:
        raise SystemExit(f"{name} logged no validation:\n{''.join(tail)}")
    return {"side": name, "wall_s": wall, "curve": curve, "final_bpb": curve[-1][2], "steps": curve[-1][1]}


def time_to(curve: list[tuple[float, int, float]], target: float) -> tuple[float, int] | None:
    """(elapsed s, step) of the first validation at or below `target` bpb."""
    return next(((t, step) for t, step, bpb in curve if bpb <= target), None)


def report(results: list[dict[str, Any]], target: float | None) -> str:
    if target is None:
        hf = [r for r in results if r["side"].startswith("hf")]
        target = (hf or results)[-1]["final_bpb"]
    lines = [f"{'side':<8} {'wall s':>8} {'steps':>6} {'val bpb':>8}   time to bpb <= {target:.3f}",
             "-" * 62]
    for r in results:
        hit = time_to(r["curve"], target)
        reach = f"{hit[0]:.1f} s (step {hit[1]})" if hit else "not reached"
        lines.append(f"{r['side']:<8} {r['wall_s']:8.1f} {r['steps']:6d} {r['final_bpb']:8.4f}   {reach}")
    if len(results) == 2:
        a, b = results
        lines.append(f"{a['side']} / {b['side']} wall time: {a['wall_s'] / b['wall_s']:.3f}x; "
                     f"bpb difference {a['final_bpb'] - b['final_bpb']:+.4f}")
        ha, hb = time_to(a["curve"], target), time_to(b["curve"], target)
        if ha and hb:
            lines.append(f"{a['side']} / {b['side']} time to bpb <= {target:.3f}: {ha[0] / hb[0]:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["hf", "hf-muon"], help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, default=0, help="shorter runs for quick checks (0 = the default)")
    parser.add_argument("--val-interval", type=int, default=0, help="validate every N steps on both (0 = default)")
    parser.add_argument("--target-bpb", type=float, default=None, help="time-to-bpb target (default: hf's final)")
    parser.add_argument("--sides", nargs="+", choices=["ours", "hf", "hf-muon"], default=None,
                        help="which, in order (default: ours, then the --peer)")
    parser.add_argument("--peer", choices=["hf", "hf-muon"], default="hf",
                        help="hf: Trainer + AdamW (the HF default); hf-muon: Trainer + torch Muon with our recipe")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--step-ab", type=int, default=0, metavar="ROUNDS",
                        help="in one process, alternate ROUNDS steps of our engine, our hand loop and the hf-muon "
                             "peer's hand loop; print median CPU ms per phase")
    parser.add_argument("--breakdown", default="", metavar="DIR",
                        help="profile each side (CPU time) into DIR and print where its CPU seconds went")
    args = parser.parse_args(argv)
    if args.sides and args.peer == "hf-muon" and "hf" in args.sides:
        # `--peer hf-muon --sides hf` once ran the AdamW peer under the hf-muon label (RESULTS.md says how): refused.
        parser.error("--sides hf is the AdamW peer; with --peer hf-muon name the side hf-muon (--sides hf-muon)")
    if args.worker:
        hf_worker(ours_flags, muon=args.worker == "hf-muon")
        return
    if args.step_ab:
        print(step_ab(ours_flags, args.step_ab))
        return
    sides = args.sides or ["ours", args.peer]
    flags = list(ours_flags)
    if args.max_steps:
        flags += ["--training-max-steps", str(args.max_steps)]
    if args.val_interval:
        flags += ["--training-val-interval", str(args.val_interval)]
    # One intra-op thread each, as `make train` runs (the Makefile's OMP_NUM_THREADS default).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = []
    prof_dir = Path(args.breakdown) if args.breakdown else None
    if prof_dir:
        prof_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-main-job-") as tmp:
        for side in sides:
            print(f"running {side} ...", flush=True)
            argv = our_argv(flags, Path(tmp) / "ours") if side == "ours" else hf_argv(flags, side)
            if prof_dir:
                argv = profiled_argv(argv, prof_dir / f"{side}.prof")
            results.append(timed_run(side, argv, OUR_VAL if side == "ours" else HF_VAL, env))
    text = report(results, args.target_bpb)
    if prof_dir:
        for r in results:
            rows = breakdown(prof_dir / f"{r['side']}.prof", r["side"], r["steps"], len(r["curve"]))
            text += f"\n{r['side']} CPU seconds (cProfile, process time):\n" + "\n".join(
                f"  {label:<24} {seconds:8.1f} s {seconds / rows[-1][1]:6.1%}  {unit}" for label, seconds, unit in rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"flags": flags, "results": results, "table": text}, indent=2))


# ------------------------------------------------------------------------------------------------ the HF worker
def hf_worker(flags: list[str], muon: bool = False) -> None:
    """Side B: train LlamaForCausalLM (Qwen3ForCausalLM under qk_norm) with the HF Trainer on our data windows under
    our resolved config; AdamW (the Trainer's), or with `muon` torch's Muon on the hidden matrices + AdamW."""
    import torch
    from transformers import Trainer, TrainingArguments

    from llm.data.text import TextDataModule, bits_per_byte
    from llm.training.train import parse_config

    config = parse_config(["--task", "lm", *flags])[0]
    t, m = config.training, config.model.resolved()
    device = torch.device("cpu" if t.device in ("auto", "cpu") and not torch.cuda.is_available() else "cuda")
    torch.manual_seed(config.seed)
    data = TextDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed)
    data.rank, data.world_size = 0, 1
    data.prepare_data()
    data.setup("fit")
    val_batches = list(data.val_dataloader())
    if t.val_max_batches:
        val_batches = val_batches[:t.val_max_batches]
    tokens_per_byte = float(getattr(data, "val_tokens_per_byte", 1.0))

    model = peer_model(m)
    optimizers = (_muon_and_adamw(model, t, Trainer), None) if muon else (None, None)
    print(f"hf: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters"
          + (f", {optimizers[0]!r}" if muon else ""), flush=True)

    val_interval = t.val_interval or t.max_steps
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum_steps,
            learning_rate=t.lr, warmup_steps=t.warmup, **_hf_schedule(t), weight_decay=t.weight_decay,
            adam_beta1=t.betas[0], adam_beta2=t.betas[1], max_grad_norm=t.grad_clip or 1e9,
            optim="adamw_torch_fused", bf16=t.precision == "bf16", use_cpu=device.type == "cpu",
            eval_strategy="steps", eval_steps=val_interval, logging_steps=t.log_interval, save_strategy="no",
            report_to="none", dataloader_num_workers=0, seed=config.seed, disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=_OurTrainWindows(data, t.max_steps * t.batch_size),
            eval_dataset=_Windows(val_batches), data_collator=_collate,
            callbacks=[_PrintEval(tokens_per_byte, bits_per_byte)], optimizers=optimizers,
        )
        trainer.train()
        if t.max_steps % val_interval:
            trainer.evaluate()


def peer_model(m: Any) -> Any:
    """The peer's model for our resolved model config `m`: LlamaForCausalLM, or Qwen3ForCausalLM under qk_norm."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if m.export_blockers():
        raise SystemExit(f"the HF peer has no {', '.join(m.export_blockers())}: compare that lever against ours alone")
    shape = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, hidden_act="silu", attention_bias=False, attn_implementation="sdpa",
    )
    if m.qk_norm:  # Qwen3 is Llama with per-head q/k RMSNorm, which is what our qk_norm is
        return Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=m.head_dim, use_sliding_window=False))
    return LlamaForCausalLM(LlamaConfig(**shape, mlp_bias=False, head_dim=m.head_dim))


def step_ab(flags: list[str], rounds: int) -> str:
    """One optimizer step three ways in one process, alternating so that the machine's load hits all alike: our
    engine's step (`_optimizer_step` + the schedule), a hand loop on our model and optimizer, and a hand loop on the
    hf-muon peer's model and optimizers (forward, backward, clip, step, zero_grad under the same autocast). Median
    CPU milliseconds (`time.process_time`, one thread) per step and per phase."""
    import statistics

    import torch
    from transformers import Trainer

    from benchmarks.bench_levers import lm_engine
    from llm.training.optim.precision import autocast

    with tempfile.TemporaryDirectory(prefix="bench-step-ab-") as tmp:
        engine, batch = lm_engine(flags, Path(tmp) / "run")
    config = engine.config
    t = config.training
    x, y = batch
    peer = peer_model(config.model.resolved())
    peer_opt = _muon_and_adamw(peer, t, Trainer)
    peer_batch = _collate([(x[i], y[i]) for i in range(x.shape[0])])
    ours, ours_opt, criterion = engine.unwrapped_model, engine.optimizer, engine.criterion
    times: dict[str, list[float]] = {}

    def timed(key: str, fn: Any) -> Any:
        start = time.process_time()
        out = fn()
        times.setdefault(key, []).append(time.process_time() - start)
        return out

    def hand(side: str, model: Any, optimizer: Any, loss_fn: Any) -> None:
        start = time.process_time()
        with autocast(t.precision, torch.device("cpu")):
            loss = timed(f"{side} forward", loss_fn)
        timed(f"{side} backward", loss.backward)
        timed(f"{side} clip", lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or 1e9))
        timed(f"{side} optimizer", optimizer.step)
        optimizer.zero_grad(set_to_none=True)
        times.setdefault(f"{side} hand step", []).append(time.process_time() - start)

    def engine_step() -> None:
        engine._optimizer_step([batch])
        engine.lr_schedule.step_batch()

    def one_round() -> None:
        timed("ours engine step", engine_step)
        hand("ours", ours, ours_opt, lambda: criterion(ours(x).flatten(0, 1).float(), y.flatten()))
        hand("peer", peer, peer_opt, lambda: peer(**peer_batch).loss)

    for _ in range(3):  # warm-up rounds, not counted
        one_round()
    times.clear()
    for _ in range(rounds):
        one_round()
    return "\n".join(f"{key:<20} median {statistics.median(v) * 1e3:8.1f} ms CPU" for key, v in times.items())


def _hf_schedule(t: Any) -> dict[str, Any]:
    """Our schedule in the Trainer's terms: cosine to `min_lr_ratio` (`cosine_with_min_lr`), or WSD
    (`warmup_stable_decay`: the same decay steps, shape and floor; ours decays over the last `decay_fraction` of the
    steps after warmup)."""
    if t.scheduler_type == "cosine":
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": t.min_lr_ratio}}
    if t.scheduler_type == "wsd":
        decay = max(1, round(max(1, t.max_steps - t.warmup) * t.decay_fraction))
        return {"lr_scheduler_type": "warmup_stable_decay",
                "lr_scheduler_kwargs": {"num_decay_steps": decay, "min_lr_ratio": t.min_lr_ratio,
                                        "decay_type": {"linear": "linear", "sqrt": "1-sqrt"}[t.decay_shape]}}
    raise SystemExit(f"the HF peer follows training.scheduler_type cosine or wsd, not {t.scheduler_type!r}")


def _muon_and_adamw(model: Any, t: Any, trainer_class: Any) -> Any:
    """torch's Muon on the decoder layers' 2-D weights (the matrices our `split_muon_params` picks: no embedding, no
    head, no norm), with our lr scale and Muon options; AdamW on the rest, decayed as the Trainer decays."""
    import torch

    from llm.training.optim.composite import CompositeOptimizer
    from llm.training.optim.optimizers import muon_options

    hidden = {id(p) for p in model.model.layers.parameters() if p.ndim == 2}
    muon = [p for p in model.parameters() if id(p) in hidden]
    decayed = set(trainer_class.get_decay_parameter_names(None, model))
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in hidden]
    lr = t.lr * t.adamw_lr_scale
    groups = [{"params": [p for n, p in rest if n in decayed], "weight_decay": t.weight_decay, "lr": lr},
              {"params": [p for n, p in rest if n not in decayed], "weight_decay": 0.0, "lr": lr}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(t.betas), fused=True)
    # AdamW first, as ours: the Trainer logs the first group's lr.
    return CompositeOptimizer([adamw, torch.optim.Muon(muon, **muon_options(t))])


def _collate(rows: list[tuple[Any, Any]]) -> dict[str, Any]:
    import torch

    x, y = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    # `shift_labels`: our targets are already the next tokens, so HF's loss scores the same T predictions per window
    # as ours (with `labels` alone it would shift them again and drop the last position).
    return {"input_ids": x, "labels": y, "shift_labels": y}


class _Windows:
    """The validation windows, batch after batch as our loader gave them (a map-style dataset read in order)."""

    def __init__(self, batches: list[tuple[Any, Any]]) -> None:
        self.rows = [(x[i], y[i]) for x, y in batches for i in range(x.shape[0])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.rows[index]


def _OurTrainWindows(data: Any, samples: int) -> Any:  # noqa: N802  (a factory of a torch IterableDataset)
    """Our train loader's windows, in its order, epoch after epoch: an IterableDataset, so the Trainer adds no
    sampler of its own and batches them exactly as our loader did."""
    from torch.utils.data import IterableDataset

    class Windows(IterableDataset):
        def __iter__(self):
            served, epoch = 0, 0
            while served < samples:
                data.set_epoch(epoch)
                for x, y in data.train_dataloader():
                    for i in range(x.shape[0]):
                        yield x[i], y[i]
                        served += 1
                epoch += 1

    return Windows()


def _PrintEval(tokens_per_byte: float, bits_per_byte: Any) -> Any:  # noqa: N802  (a factory of a TrainerCallback)
    from transformers import TrainerCallback

    class PrintEval(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = float((metrics or {})["eval_loss"])
            print(f"HF-EVAL step={state.global_step} bpb={bits_per_byte(loss, tokens_per_byte):.4f} loss={loss:.4f}",
                  flush=True)

    return PrintEval()


if __name__ == "__main__":
    main()
