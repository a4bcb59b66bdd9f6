"""Scale-out end to end, launched as users launch it: spawn and torchrun, DDP and FSDP, two "nodes", failures.

Each multi-process run is held to a single-process run with the same global batch (2 x 8 = 16): the same
training and validation losses and final weights, to 1e-5. The data set has 330 samples, so validation has
33: at 8 per batch over two ranks, rank 0 gets 17 samples (3 batches) and rank 1 gets 16 (2 batches), the
uneven split that validation must weigh exactly and, under FSDP, keep in lockstep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import CKPT, REPO, TINY_REGRESSION, make_config, read_metrics, run_cli
from safetensors.torch import load_file, load_model

from llm.training.tasks.regression_task import RegressionTask

pytestmark = pytest.mark.slow  # every test launches two-process jobs (spawn, torchrun)

COMMON = [*TINY_REGRESSION, "--data-num-samples", "330", "--training-max-steps", "6", "--training-val-interval", "3",
          "--seed", "3", "--plugins", "scaleout_plugin"]
# With the default coefficients: the load-balancing loss counts expert loads over the global batch (all ranks),
# so N ranks optimize what one process does with their global batch.
MOE = ["--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2"]
BOOM = "RuntimeError: boom at step 3 on rank 1"

PLUGIN = textwrap.dedent('''
    """Callbacks that misbehave on purpose, for the scale-out tests."""
    import os
    import signal

    from llm.training.core.callbacks import Callback
    from llm.registry import register_callback


    @register_callback("RaiseOnRank1")
    class RaiseOnRank1(Callback):
        def on_batch_end(self, logs=None):
            if self.engine.rank == 1 and self.engine.state.step == 3:
                raise RuntimeError("boom at step 3 on rank 1")


    @register_callback("KillRank1Once")
    class KillRank1Once(Callback):
        """SIGKILL rank 1 after step 3 of torchrun's first attempt (the checkpoint of step 2 is complete)."""

        def on_batch_end(self, logs=None):
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if self.engine.rank == 1 and self.engine.state.step == 3 and first_attempt:
                os.kill(os.getpid(), signal.SIGKILL)


    @register_callback("StopAtStep3")
    class StopAtStep3(Callback):
        def on_batch_end(self, logs=None):
            if self.engine.state.step == 3:
                self.engine.should_stop = True
''')


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale-out")
    (path / "scaleout_plugin.py").write_text(PLUGIN)
    return path


def env(workdir: Path) -> dict[str, str]:
    # One intra-op thread per process (torchrun's default): tiny models on a busy 2-core machine.
    return {"PYTHONPATH": f"{REPO}:{workdir}", "OMP_NUM_THREADS": "1"}


def start(cmd: list[str], cwd: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for `proc`; on a timeout end it (and its workers) and fail with its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun's agent stops its workers (own sessions) on SIGTERM; spawn's share our group
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, proc.args))}\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train(workdir: Path, args: list[str], launcher: str = "one", torchrun_args: list[str] = (), timeout: float = 240,
          cwd: Path | None = None, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in one process, 2 spawned processes, or 2 torchrun workers; returns the completed process."""
    cmd = [sys.executable, "-m", "llm.training.train", *args]
    if launcher == "spawn":
        cmd += ["--distributed-nproc-per-node", "2"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--monitor-interval", "0.2", *torchrun_args, "-m", "llm.training.train", *args]
    return finish(start(cmd, cwd or workdir, {**env(workdir), **(extra_env or {})}), timeout)


def by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}  # a replayed step: the last one counts


def assert_same_run(run_dir: Path, ref_dir: Path, tol: float = 1e-5) -> None:
    for key in ("train/loss", "val/loss"):
        got, want = by_step(run_dir, key), by_step(ref_dir, key)
        assert got.keys() == want.keys() and got, (key, got, want)
        assert list(got.values()) == pytest.approx(list(want.values()), abs=tol), key
    got, want = load_file(run_dir / "model.safetensors"), load_file(ref_dir / "model.safetensors")
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < tol, f"final weights differ by {worst}"


@pytest.fixture(scope="module")
def reference(workdir) -> dict[str, Path]:
    """Single-process runs with the global batch of 16: dense and MoE."""
    runs = {}
    # moe-accum: the same 16 samples as 2 micro-batches of 8, the micro-batches 2 ranks x 4 make (rank r takes every
    # W-th sample of the global batch); the balance loss counts the step's micro-batches so far, so accumulation is
    # part of what a run computes.
    for name, extra in (("dense", ["--training-batch-size", "16"]), ("moe", [*MOE, "--training-batch-size", "16"]),
                        ("moe-accum", [*MOE, "--training-batch-size", "8", "--training-grad-accum-steps", "2"])):
        proc = train(workdir, [*COMMON, *extra, "--logging-log-dir", f"ref-{name}"])
        assert proc.returncode == 0, proc.stderr
        runs[name] = workdir / f"ref-{name}"
    return runs


@pytest.mark.parametrize("strategy, launcher, model", [
    ("ddp", "spawn", "dense"), ("ddp", "torchrun", "moe"), ("fsdp", "spawn", "moe"), ("ddp-ep", "spawn", "moe"),
])
def test_two_processes_match_one_process(workdir, reference, strategy, launcher, model):
    """ddp-ep: DDP with the 4 experts split over the 2 ranks (expert parallel 2, all-to-all dispatch)."""
    name = f"{strategy}-{launcher}-{model}"
    # FSDP with 2 micro-batches of 4 (its gradients are reduce-scattered per micro-batch): the same 16 samples.
    batch = ["--training-batch-size", "4", "--training-grad-accum-steps", "2"] if strategy == "fsdp" else \
        ["--training-batch-size", "8"]
    parallel = ["--distributed-strategy", "ddp", "--distributed-expert-parallel", "2"] if strategy == "ddp-ep" else \
        ["--distributed-strategy", strategy]
    args = [*COMMON, *(MOE if model == "moe" else []), *parallel, *batch]
    if launcher == "torchrun":  # the default run directory: rank 0's name, broadcast to the other worker
        (workdir / name).mkdir()
        proc = train(workdir, args, launcher, cwd=workdir / name)
        run_dirs = list((workdir / name / "runs").iterdir())
        assert len(run_dirs) == 1, run_dirs
        run = run_dirs[0]
    else:
        proc = train(workdir, [*args, "--logging-log-dir", name], launcher)
        run = workdir / name
    assert proc.returncode == 0, proc.stderr
    assert_same_run(run, reference[f"{model}-accum" if strategy == "fsdp" else model])
    steps = [m["step"] for m in read_metrics(run) if "train/loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # one writer: each step logged once
    written = sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents"))
    assert written == ["checkpoints", "config.yaml", "metrics.jsonl", "model.safetensors", "train.log"]
    assert len(list(run.glob("events.out.tfevents*"))) == 1  # one writer of every record


def test_killed_worker_restarts_from_its_sharded_fsdp_checkpoint(workdir, reference, tmp_path):
    """torchrun FSDP, rank 1 SIGKILLed after step 3: the group restarts, resumes from the sharded checkpoint of
    step 2 and ends where one uninterrupted process does; the last checkpoint exports to one safetensors file."""
    args = [*COMMON, *CKPT, "KillRank1Once", "--checkpoint-interval", "2", "--distributed-strategy", "fsdp",
            "--training-batch-size", "8", "--logging-log-dir", "restart"]
    # torchrun >= 2.5 shares one store across restarts, so a restarted group may read the failed attempt's
    # addresses (pytorch/pytorch#135712); this opt-out gives each attempt its own (see docs/scale-out.md).
    fresh_store = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = train(workdir, args, "torchrun", ["--max-restarts", "1"], extra_env=fresh_store)
    assert proc.returncode == 0, proc.stderr
    run = workdir / "restart"
    assert "resumed from restart/checkpoints/step-00000002 at step 2" in proc.stderr
    assert_same_run(run, reference["dense"])

    last = run / "checkpoints" / "step-00000006"
    assert (last / "sharded" / ".metadata").is_file() and not (last / "model.safetensors").exists()
    out = tmp_path / "exported.safetensors"
    export = run_cli([str(last), str(out)], workdir, module="llm.artifacts.consolidate", env=env(workdir))
    assert export.returncode == 0, export.stderr
    exported, final = load_file(out), load_file(run / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    config, _ = make_config(tmp_path)
    load_model(RegressionTask(config).build_model(), out, strict=True)  # one plain process, the task's model


@pytest.mark.skipif(
    os.environ.get("LLM_MULTINODE_TESTS") != "1",
    reason="two torchrun launchers on loopback occasionally hang in torchrun's own shutdown on this 2-core CI "
    "machine; run with LLM_MULTINODE_TESTS=1",
)
def test_two_nodes_on_loopback_train_and_resume(workdir, reference):
    """Two torchrun launchers (one per "node") meet at a c10d rendezvous; the second job resumes the first.

    The rendezvous store is hosted here, as a cluster's long-lived endpoint would be: when one of the launchers
    hosts it, the other can lose it while both shut down (a torchrun race, unrelated to training).
    """
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)

    def two_nodes(callbacks: list[str], job: str) -> list[str]:
        args = [*COMMON, "--training-batch-size", "8", "--logging-log-dir", "two-nodes", *CKPT, *callbacks]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-id", job,
                  "--rdzv-conf", "is_host=false"]
        procs = [start([*launch, "--node-rank", str(node), "-m", "llm.training.train", *args], workdir, env(workdir))
                 for node in (0, 1)]
        done = [finish(p, 240) for p in procs]
        for result in done:
            assert result.returncode == 0, result.stderr
        return [result.stderr for result in done]

    two_nodes(["StopAtStep3"], "first")
    saved = sorted(p.name for p in (workdir / "two-nodes" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == ["step-00000003"]
    errs = two_nodes([], "second")
    assert any("resumed from two-nodes/checkpoints/step-00000003 at step 3" in err for err in errs), errs
    assert_same_run(workdir / "two-nodes", reference["dense"])


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_one_failing_rank_ends_the_job_promptly_reported_once(workdir, launcher):
    args = [*COMMON, "--training-callbacks", "MetricsLogger", "RaiseOnRank1", "--training-batch-size", "8",
            "--logging-log-dir", f"boom-{launcher}"]
    # Promptly: well within the timeout (which fails the test), where a rank left waiting on a collective would
    # hang for the process group's timeout (30 min).
    proc = train(workdir, args, launcher, timeout=120)
    assert proc.returncode != 0, (proc.returncode, proc.stderr)
    assert proc.stderr.count(BOOM) == 1, proc.stderr  # by rank 1 only; rank 0 merely lost its peer
    assert "lost contact" not in proc.stderr  # rank 0 was ended by the launcher while it waited


# FSDP's reshard on a smaller world is held by the HSDP test (an HSDP 2 x 2 checkpoint resumed in one process) and the
# tensor-parallel one (a TP2 x DP2 checkpoint resumed by FSDP 2 and by one process).
@pytest.mark.parametrize("strategy, before, after", [("ddp", 2, 1), ("ddp", 1, 2)])
def test_resume_on_another_world_size_continues_the_same_run(workdir, reference, strategy, before, after):
    """Elastic resume: stopped after step 3 on `before` processes, resumed on `after` with the same global batch of
    16; the data position is remapped (sample 48 of the epoch), so the run ends where one uninterrupted process does
    (a sample seen twice or skipped would change the losses and weights)."""
    name = f"elastic-{strategy}-{before}-{after}"
    args = [*COMMON, "--distributed-strategy", strategy, "--logging-log-dir", name]
    for procs, extra in ((before, ["StopAtStep3"]), (after, [])):
        batch = ["--training-batch-size", str(16 // procs)]
        proc = train(workdir, [*args, *batch, *CKPT, *extra], "spawn" if procs == 2 else "one")
        assert proc.returncode == 0, proc.stderr
    assert f"resuming a checkpoint of {before} process(es) on {after}" in proc.stderr, proc.stderr
    assert "remapped to sample 48 of epoch 0" in proc.stderr
    assert_same_run(workdir / name, reference["dense"])


def test_expert_parallel_checkpoint_holds_every_expert_and_resumes_on_another_degree(workdir, reference):
    """Stopped after step 3 with the experts split over 2 ranks, resumed in one process without expert parallelism:
    the checkpoint is the same format as any other (every expert, optimizer state included), so the run ends where
    one uninterrupted process does."""
    name = "ep-resume"
    args = [*COMMON, *MOE, "--logging-log-dir", name, *CKPT]
    proc = train(workdir, [*args, "StopAtStep3", "--training-batch-size", "8", "--distributed-expert-parallel", "2"],
                 "spawn")
    assert proc.returncode == 0, proc.stderr
    saved = load_file(next((workdir / name / "checkpoints").glob("step-*")) / "model.safetensors")
    experts = [t for k, t in saved.items() if k.endswith(("w_gate_up", "w_down"))]
    assert experts and all(t.shape[0] == 4 for t in experts)  # all 4 experts, gathered from both ranks
    proc = train(workdir, [*args, "--training-batch-size", "16"], "one")
    assert proc.returncode == 0, proc.stderr
    assert "resuming a checkpoint of 2 process(es) on 1" in proc.stderr, proc.stderr
    assert_same_run(workdir / name, reference["moe"])
