"""Packing (`llm.data.packing`, `--data-packing` for sft) and document masks for lm windows (`--data-document-mask`).

Exactness: a packed example's loss and gradients are the ones it gets alone; a packed micro-batch's loss is the
unpacked loss of the same examples; an eval-only run's val/loss is the same packed and unpacked; a packed run
resumes bitwise; ranks see the rows one process sees.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import call_main, read_metrics, run_cli
from safetensors.torch import load_file

from llm.data.packing import PackCollate, PackedExamples, best_fit_decreasing
from llm.data.sft import IGNORE_INDEX, PadCollate, SFTDataModule, demo_records, render, to_example
from llm.data.text import window_document_ids
from llm.data.tokenizers import ByteTokenizer
from llm.models.decoder import DecoderModel
from llm.training.core.config import Config
from llm.training.tasks.lm_task import LMTask
from llm.training.train import main as train_main

SFT = [
    "--task", "sft", "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4",
    "--data-num-samples", "128", "--data-seq-len", "96", "--training-batch-size", "4", "--training-warmup", "2",
    "--training-precision", "fp32", "--training-device", "cpu", "--training-log-interval", "2",
    "--training-callbacks", "LRSchedulerCallback", "--logging-loggers", "jsonl",
]


# ------------------------------------------------------------------------------------------------- bin packing
def test_best_fit_decreasing_fills_the_tightest_bin_and_is_deterministic():
    lengths = [5, 7, 3, 2, 4, 1, 6, 2]
    bins = best_fit_decreasing(lengths, 10)
    # 7 -> A(3 left), 6 -> B(4), 5 -> C(5), 4 -> B(0), 3 -> A(0), 2 -> C(3), 2 -> C(1), 1 -> C(0)
    assert bins == [[1, 2], [6, 4], [0, 3, 7, 5]]
    assert best_fit_decreasing(lengths, 10) == bins
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    rng = np.random.default_rng(0)
    many = [int(n) for n in rng.integers(1, 65, 500)]
    packed = best_fit_decreasing(many, 64)
    assert all(sum(many[i] for i in b) <= 64 for b in packed)
    assert len(packed) <= int(np.ceil(sum(many) / 64) * 1.1) + 1  # near the lower bound
    with pytest.raises(ValueError, match="item 1 has length 11, outside 1..10"):
        best_fit_decreasing([3, 11], 10)


def _examples(n=6, seed=0):
    tok = ByteTokenizer()
    records = demo_records(n, seed)
    out = []
    for r in records:
        messages = [("user", r["prompt"]), ("assistant", r["response"])] if "prompt" in r else \
            [(m["role"], m["content"]) for m in r["messages"]]
        out.append(to_example(*render(messages, tok), 200))
    return out


def _per_example_nll(logits, labels, doc_ids, members):
    """{example: mean nll over its answer tokens} from a packed batch."""
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    nll, answer, docs = nll.view(labels.shape), labels != IGNORE_INDEX, doc_ids
    out = {}
    for row, items in enumerate(members):
        for d, example in enumerate(items):
            keep = answer[row] & (docs[row] == d)
            out[example] = nll[row][keep].sum() / keep.sum()
    return out


def test_a_packed_example_gets_the_loss_and_gradients_it_gets_alone():
    examples = _examples()
    packed = PackedExamples(examples, 128)
    assert len(packed) < len(examples)  # several examples share rows
    ids, labels, docs = PackCollate(0, IGNORE_INDEX)([packed[i] for i in range(len(packed))])
    torch.manual_seed(0)
    model = DecoderModel.tiny(max_seq_len=256)
    params = list(model.parameters())
    per_example = _per_example_nll(model(ids, document_ids=docs), labels, docs, packed.bins)
    assert sorted(per_example) == list(range(len(examples)))
    for i, (x, y) in enumerate(examples):
        alone = F.cross_entropy(model(torch.as_tensor(x)[None])[0], torch.as_tensor(y), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(per_example[i], alone, atol=1e-5, rtol=0)
        g_packed = torch.autograd.grad(per_example[i], params, retain_graph=True)
        g_alone = torch.autograd.grad(alone, params)
        for a, b in zip(g_packed, g_alone):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_packed_micro_batch_has_the_unpacked_loss_of_its_examples():
    """The sft loss (mean over the micro-batch's answer tokens) of packed rows == that of the same examples padded."""
    from llm.training.tasks.sft_task import SFTTask

    examples = _examples(8, seed=1)
    packed = PackedExamples(examples, 160)
    task = SFTTask(Config(task="sft"))
    criterion = task.build_criterion()
    torch.manual_seed(0)
    model = DecoderModel.tiny(max_seq_len=256).eval()
    with torch.no_grad():
        loss_packed = task._loss(PackCollate(0, IGNORE_INDEX)(list(packed.rows)), model, criterion)
        loss_padded = task._loss(PadCollate(0)(examples), model, criterion)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)


def test_ranks_see_the_packed_rows_one_process_sees(tmp_path):
    """N processes = 1 process: packing happens before sharding, so the ranks' micro-batches make up the global
    batch of one process, row for row."""
    def batches(rank, world, batch_size):
        config = Config(task="sft")
        config.data.num_samples, config.data.seq_len, config.data.packing = 96, 160, True
        dm = SFTDataModule(config.data, batch_size=batch_size, seed=3)
        dm.rank, dm.world_size = rank, world
        dm.setup()
        return [b for b in dm.train_dataloader()][:3]

    one = batches(0, 1, 4)
    r0, r1 = batches(0, 2, 2), batches(1, 2, 2)
    for step in range(3):
        rows = {tuple(r[r != 0].tolist()) for b in (r0[step], r1[step]) for r in b[0]}
        assert rows == {tuple(r[r != 0].tolist()) for r in one[step][0]}
        assert len(one[step]) == 3 and one[step][2].shape == one[step][0].shape  # (ids, labels, document ids)
        assert one[step][0].shape[1] == 160  # full rows: one shape for every batch


@pytest.mark.slow  # a 2-process job
def test_two_processes_train_packed_lora_sft_as_one(tmp_path):
    """N processes = 1 process: the ranks hold different numbers of answer tokens, and every token of the global
    micro-batch still weighs the same (sft_task._loss; unpacked batches take the same path). With LoRA adapters:
    DDP starts every rank from rank 0's weights, so the frozen base stays the single process's bit for bit."""
    common = [*SFT, "--data-packing", "--training-lora-rank", "4", "--training-max-steps", "4",
              "--training-log-interval", "1", "--training-val-max-batches", "2", "--training-optimizer", "adamw"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main([*common, "--training-batch-size", "8", "--logging-log-dir", str(one)]) == 0
    proc = run_cli([*common, "--distributed-nproc-per-node", "2", "--logging-log-dir", str(two)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")  # merged weights
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    la, lb = ([r["train/loss"] for r in read_metrics(run) if "train/loss" in r] for run in (one, two))
    assert len(la) == 4 and la == pytest.approx(lb, abs=1e-5)
    a, b = (load_file(run / "checkpoints" / "step-00000004" / "model.safetensors") for run in (one, two))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_" not in k)
    trained = [k for k in b if "lora_B" in k]
    assert trained and all(b[k].abs().sum() > 0 for k in trained)  # B starts at zero: the adapters trained


# --------------------------------------------------------------------------------------------- runs of sft
def test_eval_only_val_loss_is_the_same_packed_and_unpacked(tmp_path):
    values = {}
    for packing in (False, True):
        run = tmp_path / f"run-{packing}"
        flags = [*SFT, "--training-eval-only", "--logging-log-dir", str(run), *(["--data-packing"] if packing else [])]
        assert train_main(flags) == 0
        values[packing] = next(r for r in read_metrics(run) if "val/loss" in r)
    assert values[True]["val/loss"] == pytest.approx(values[False]["val/loss"], abs=1e-5)
    assert values[True]["val/accuracy"] == pytest.approx(values[False]["val/accuracy"], abs=1e-6)


def test_a_packed_sft_run_resumes_bitwise(tmp_path):
    args = [*SFT, "--data-packing", "--training-max-steps", "6", "--checkpoint-interval", "3",
            "--training-val-max-batches", "1"]
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "a")]) == 0
    resume = tmp_path / "a" / "checkpoints" / "step-00000003"
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "b"), "--checkpoint-resume", str(resume)]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "a") if "train/loss" in r}
    again = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "b") if "train/loss" in r}
    assert again[6] == losses[6]


@pytest.mark.parametrize("task, flag, message", [
    ("lm", "--data-packing", "error: data.packing: invalid value True; the lm task's data is not packed"),
    ("sft", "--data-document-mask", "error: data.document_mask: invalid value True; it applies to the lm task"),
])
def test_a_flag_of_the_other_task_is_refused_in_one_line(tmp_path, task, flag, message):
    proc = call_main(train_main, ["--task", task, flag, "--logging-log-dir", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ document masks for lm
def test_a_separator_belongs_to_the_document_it_ends():
    eos = 0
    ids = torch.tensor([[5, 6, 0, 7, 0, 0, 8], [0, 1, 2, 3, 4, 5, 6]])
    assert window_document_ids(ids, eos).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


LM = ["--task", "lm", "--data-seq-len", "32", "--data-val-fraction", "0.2", "--model-hidden-size", "32",
      "--model-num-layers", "1", "--model-num-heads", "2", "--training-batch-size", "4", "--training-max-steps", "2",
      "--training-precision", "fp32", "--training-device", "cpu", "--training-callbacks", "MetricsLogger",
      "--logging-loggers", "jsonl"]


def test_document_masked_lm_windows_never_attend_across_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"document {i} says " + "abc " * (3 + i), encoding="utf-8")
    args = [*LM, "--data-path", str(corpus), "--data-cache-dir", str(tmp_path / "cache"), "--data-document-mask"]
    from llm.training.train import parse_config

    config, task_class, _ = parse_config([*args, "--logging-log-dir", str(tmp_path / "run")])
    task = task_class(config)
    dm = task.build_data_module()
    dm.prepare_data()
    dm.setup()
    assert dm.document_separator == 0
    ids, targets = next(iter(dm.train_dataloader()))
    assert (ids == 0).any()  # the windows cross documents
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        loss = task._loss((ids, targets), model, task.build_criterion())
        # Reference: every document piece of every window on its own.
        docs = window_document_ids(ids, 0)
        nll = []
        for row in range(ids.shape[0]):
            for d in docs[row].unique():
                keep = docs[row] == d
                logits = model(ids[row][keep][None])[0]
                nll.append(F.cross_entropy(logits, targets[row][keep], reduction="none"))
        plain = task.build_criterion()(model(ids).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, torch.cat(nll).mean(), atol=1e-5, rtol=0)
    assert abs(loss.item() - plain.item()) > 1e-4  # the mask changed what the model sees
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "run")]) == 0


def test_document_mask_on_data_without_boundaries_is_refused(tmp_path):
    tokens = np.arange(1, 201, dtype=np.uint16) % 255 + 1  # byte ids 1..255: no separator (0) anywhere
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    proc = call_main(train_main, [*LM, "--data-path", str(path), "--data-seq-len", "8", "--data-document-mask",
                                  "--logging-log-dir", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.document_mask: ")
    assert "marks no document boundaries (the tokenizer's end-of-sequence token 0 never occurs in it)" in lines[0]


def test_lm_task_without_the_flag_passes_no_document_ids():
    config = Config(task="lm")
    task = LMTask(config)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, ids, **kwargs):
            seen.update(kwargs)
            return torch.zeros(*ids.shape, 4)

    task._loss((torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)), Spy(),
               torch.nn.CrossEntropyLoss())
    assert seen == {}
