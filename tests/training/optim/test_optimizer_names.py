"""What the logs call the optimizer: the start-up line naming each optimizer and its share of the parameters, and
`lr/<kind>` keys read at the same point as `lr` (the lr the step's update used)."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import read_metrics, tiny_engine

from llm.models.decoder import DecoderModel
from llm.training.optim.composite import CompositeOptimizer
from llm.training.optim.optimizers import build_optimizer, describe_optimizer, group_lrs, split_muon_params

CFG = types.SimpleNamespace(optimizer="muon", lr=1e-3, muon_lr_scale=8.0, weight_decay=0.1, betas=[0.9, 0.95],
                            momentum=0.9)


def test_muon_composite_is_named_with_roles_and_counts():
    model = DecoderModel.tiny()
    optimizer = build_optimizer(model, CFG)
    muon, rest = split_muon_params(model)
    n_muon, n_rest = sum(p.numel() for p in muon), sum(p.numel() for p in rest)
    expected = f"muon (hidden matrices, {n_muon:,} params) + adamw (rest, {n_rest:,} params)"
    assert describe_optimizer(optimizer) == expected
    # AdamW's decayed and undecayed groups share an lr, hence one key; Muon's is scaled.
    assert group_lrs(optimizer) == {"adamw": 1e-3, "muon": 8e-3}


def test_groups_of_one_kind_that_differ_get_indexed_names():
    a, b, c = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    sgd = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}], lr=0.1)
    adamw = torch.optim.AdamW([c], lr=0.3)
    composite = CompositeOptimizer([sgd, adamw])
    assert group_lrs(composite) == {"sgd.0": 0.1, "sgd.1": 0.2, "adamw": 0.3}
    assert group_lrs(composite, [1.0, 2.0, 3.0]) == {"sgd.0": 1.0, "sgd.1": 2.0, "adamw": 3.0}
    assert describe_optimizer(sgd) == "sgd (8 params)"  # one optimizer: no roles


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("muon")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"value_{i} = {i} * {i % 5}\n" for i in range(800)), encoding="utf-8")
    args = ["--task", "lm", "--data-path", str(corpus), "--data-cache-dir", str(tmp / "cache"), "--data-seq-len",
            "32", "--model-max-seq-len", "32", "--model-hidden-size", "32", "--model-num-layers", "2",
            "--model-num-heads", "2", "--training-batch-size", "4", "--training-max-steps", "6", "--training-warmup",
            "2", "--training-log-interval", "1", "--training-val-interval", "0", "--training-val-max-batches", "1",
            "--training-precision", "fp32", "--training-device", "cpu", "--training-optimizer", "muon",
            "--training-callbacks", "MetricsLogger", "LRSchedulerCallback"]
    engine = tiny_engine(tmp, *args, base=[])
    said: list[str] = []
    engine.logger.info = lambda msg, *a: said.append(msg % a)  # type: ignore[method-assign]
    try:
        engine.run()
    finally:
        del engine.logger.info  # the logger is shared: its own method again
    return engine, said


def test_lr_and_named_group_lrs_agree_on_every_line(muon_run):
    engine, _ = muon_run
    records = [r for r in read_metrics(engine.run_dir) if "lr" in r]
    assert len(records) == 6 and not any(k.startswith("lr/group") for r in records for k in r)
    for r in records:
        assert r["lr/adamw"] == r["lr"] and r["lr/muon"] == pytest.approx(8 * r["lr"]), r
    assert [r["lr"] for r in records][:2] == pytest.approx([5e-4, 1e-3])  # the warmup's lrs: read before the step


def test_start_up_names_the_optimizers(muon_run):
    _, said = muon_run
    lines = [line for line in said if line.startswith("optimizer: ")]
    assert len(lines) == 1 and lines[0].startswith("optimizer: muon (hidden matrices, "), said
    assert " + adamw (rest, " in lines[0]
