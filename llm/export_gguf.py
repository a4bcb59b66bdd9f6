"""Export a run as one GGUF file (llama.cpp's format), architecture ``llama``, with its tokenizer.

    python -m llm.export RUN_OR_CKPT --to gguf OUT.gguf [--dtype f32|f16|bf16|q8_0] [--overwrite]

What is written (the `gguf` package does the encoding; ``pip install 'llm[gguf]'``):

- Hyperparameters under ``llama.*``: context length (``max_seq_len``), embedding length, block count, feed-forward
  length, head counts, rope dimension count (head_dim) and frequency base, RMSNorm epsilon, vocabulary size.
- Tensors with llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``, ``output``; no ``output``
  when the embeddings are tied). The rows of q and k are permuted per head from the rotate-half layout
  (Hugging Face's and ours: pairs ``(i, i + head_dim/2)``) to llama.cpp's interleaved one (pairs ``(2i, 2i+1)``);
  a GGUF loader undoes that when it reads ``llama`` files.
- ``--dtype``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices (default: the stored dtype's float type).
  Norm weights (1-D) stay f32, as llama.cpp keeps them; with ``q8_0`` a matrix whose rows are not a multiple of
  32 values (Q8_0's block) is written f16, as llama.cpp's converter does.
- The tokenizer as ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE): tokens by id, merges, token types (the
  special tokens are CONTROL), eos = the run's document separator; bos and padding are the same token, and the
  file says not to add bos (our runs never prepend one). The byte tokenizer is written as the byte-level
  vocabulary `llm.data.tokenizers.byte_level_tokenizer` builds (id = byte value, id 0 = ``<|endoftext|>``), so
  transformers encodes text to the ids the run was trained on. It has no merges, and GGUF cannot store an empty
  array: the file carries zero scores instead (transformers derives no merges from them), and llama.cpp, which
  requires ``tokenizer.ggml.merges``, refuses such a file; a BPE run's file has merges. Model rows beyond the
  tokenizer's vocabulary (a vocabulary padded for speed) get unreachable ``[PAD<id>]`` tokens of type UNUSED.

Refused with one line (exit status 2): MoE models, a model with features the ``llama`` architecture cannot state
(found as tensors or config fields other than the plain Llama ones), a tokenizer other than byte-level BPE, a
target without the ``.gguf`` suffix. The file is written beside the target
(``.OUT.gguf.export-tmp-<host>-<pid>-<n>``) and renamed over it at the end (`llm.fs.publish`), so ``OUT.gguf`` is
the old file or the new one at every instant; a failed export removes its temp file, and a killed one's is removed
by the next export into the same target once its writer is gone (`llm.fs.is_abandoned`). ``--overwrite`` may
replace only a previous GGUF file (it starts with the ``GGUF`` magic); anything else (another file, a directory, a
symbolic link, the source's own directory or a path inside it) is refused, with or without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm import fs
from llm.artifacts.runs import RunFiles, load_run, resolve_run
from llm.data.tokenizers import ByteTokenizer, Tokenizer, byte_level_tokenizer
from llm.errors import UserError
from llm.models.decoder import DecoderModel
from llm.models.hf import _config_to_hf, _state_dict_to_hf

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_MAGIC = b"GGUF"
_FROM_TORCH = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_Q8_BLOCK = 32  # values per Q8_0 block: a row must be a multiple of it
# The only `config.json` fields a plain Llama has (what `_config_to_hf` writes today); a field beyond these
# (rope scaling, biases, QK-norm, a sliding window, ...) changes the function in a way this file does not state.
_LLAMA_FIELDS = {"architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
                 "rms_norm_eps", "rope_parameters", "rope_theta", "tie_word_embeddings", "attention_dropout", "dtype",
                 "torch_dtype", "use_cache", "attention_bias", "mlp_bias", "pretraining_tp"}
_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_UNUSED = 1, 3, 5  # llama.cpp's token types
TEMP_MARK = ".export-tmp-"
_SERIAL = iter(range(1 << 62))


class GGUFExportError(UserError):
    """A user-facing problem with a GGUF export (one line, exit status 2)."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("--to gguf needs the gguf package: pip install 'llm[gguf]' (or pip install gguf)") \
            from None
    return gguf


# -------------------------------------------------------------------------------------------------- model
def _hyperparameters(model: DecoderModel) -> dict[str, Any]:
    """The model's Llama config.json fields; refuses what the ``llama`` GGUF architecture cannot state."""
    if model.config.use_moe:
        raise GGUFExportError("a GGUF export of a Mixture-of-Experts model is not supported; export it with --to hf")
    if model.config.export_blockers():  # a lever the llama architecture lacks (issue 24: logit soft-capping)
        raise GGUFExportError(f"the model has {', '.join(model.config.export_blockers())}, which the GGUF llama "
                              "export cannot state; it cannot be exported")
    try:
        hf = _config_to_hf(model)
    except ValueError as exc:
        raise GGUFExportError(str(exc)) from None
    if hf.get("model_type") != "llama":
        raise GGUFExportError(f"--to gguf writes the llama architecture; this model is {hf.get('model_type')!r}")
    extra = sorted(k for k in set(hf) - _LLAMA_FIELDS if hf[k] not in (None, False))  # `sliding_window: null` is fine
    if extra or hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act") != "silu":
        field = extra[0] if extra else "attention_bias/mlp_bias/hidden_act"
        raise GGUFExportError(f"the model's {field} has no equivalent in the GGUF llama export; export it with --to hf")
    if hf["head_dim"] * hf["num_attention_heads"] != hf["hidden_size"]:
        raise GGUFExportError(f"head_dim {hf['head_dim']} is not hidden_size / num_heads, which the GGUF llama export "
                              "assumes; export it with --to hf")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope_type {rope['rope_type']!r} is not written by the GGUF export; "
                              "export it with --to hf")
    return hf


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.removeprefix("model.layers.").split(".", 1)
    if hf_name.startswith("model.layers.") and len(parts) == 2 and parts[1].endswith(".weight"):
        kind = _LAYER_NAMES.get(parts[1].removesuffix(".weight"))
        if kind is not None:
            return f"blk.{parts[0]}.{kind}.weight"
    raise GGUFExportError(f"tensor {hf_name} has no place in a GGUF llama file; export this model with --to hf")


def interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows from the rotate-half layout (each head: first halves, then second halves of the
    rotated pairs) to llama.cpp's interleaved one (the two members of a pair next to each other)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _add_tensor(writer: Any, gguf: Any, name: str, tensor: torch.Tensor, dtype: str) -> None:
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, data)
    elif dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % _Q8_BLOCK):
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quantize(data, qtype), raw_dtype=qtype)


# ---------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[str], set[int]]:
    """(tokens by id, merges as ``"a b"``, ids of the special tokens) of a byte-level BPE tokenizer."""
    tok = byte_level_tokenizer() if isinstance(tokenizer, ByteTokenizer) else getattr(tokenizer, "tok", None)
    if tok is None:
        raise GGUFExportError(f"the run's tokenizer ({type(tokenizer).__name__}) cannot be written to GGUF")
    spec = json.loads(tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    # Without merges (the byte vocabulary) how text is split before merging changes nothing; with merges the split
    # must be GPT-2's regex, the one `tokenizer.ggml.pre = "gpt-2"` names.
    split_ok = pre.get("use_regex", True) or not model.get("merges")
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not split_ok or spec.get("normalizer"):
        kind = pre.get("type") or model.get("type") or "unknown"
        raise GGUFExportError(f"the run's tokenizer ({model.get('type')} with pre-tokenizer {kind}) is not GPT-2 "
                              "style byte-level BPE, the one tokenizer kind the GGUF export writes")
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {entry["id"] for entry in spec.get("added_tokens") or [] if entry.get("special")}
    return tokens, merges, special


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    tokens, merges, special = _tokenizer_vocabulary(tokenizer)
    if len(tokens) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} rows")
    known = len(tokens)
    tokens += [f"[PAD{i}]" for i in range(known, vocab_size)]
    types = [_TOKEN_CONTROL if i in special else _TOKEN_NORMAL if i < known else _TOKEN_UNUSED
             for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, which ByteLevel(use_regex=True) applies
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # GGUF cannot hold an empty array; transformers derives merges from scores then (none: every token is 1 char)
        writer.add_token_scores([0.0] * vocab_size)
    eos = tokenizer.eos_id
    if eos is not None:
        writer.add_eos_token_id(eos)
        writer.add_bos_token_id(eos)
        writer.add_pad_token_id(eos)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# ------------------------------------------------------------------------------------------------- target
def _is_gguf(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    return False


def check_gguf_target(out: str | Path, files: RunFiles, overwrite: bool = False) -> None:
    """Refuse a GGUF target that is not a ``.gguf`` name, lies in the source, is a link or a directory, or exists
    without ``overwrite`` / is not a GGUF file with it."""
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise GGUFExportError(f"{out}: a GGUF export is one file; name it with the .gguf suffix")
    target = Path(os.path.realpath(out))
    for source in (files.run_dir, files.weights.parent, files.checkpoint_dir):
        if source is not None:
            real = Path(os.path.realpath(source))
            if target == real or real in target.parents:
                raise GGUFExportError(f"{out} is inside the source's own directory {source}; pick a path outside it")
    if out.is_symlink():
        raise GGUFExportError(f"{out} is a symbolic link: an export never writes through a link; name its target")
    if out.exists():
        if not out.is_file():
            raise GGUFExportError(f"{out} exists and is not a file")
        if not _is_gguf(out):
            raise GGUFExportError(f"{out} exists and is not a GGUF file: --overwrite replaces only a previous "
                                  "GGUF export; pick another path")
        if not overwrite:
            raise GGUFExportError(f"{out} exists; pass --overwrite to replace it")


def _remove_abandoned(parent: Path, name: str) -> None:
    """Remove the temp files of exports into ``parent / name`` whose writer is gone (killed mid-write):
    `llm.fs.is_abandoned`, with the writer's host and pid read back from the temp's name."""
    prefix = f".{name}{TEMP_MARK}"
    for path in parent.iterdir():
        if not path.name.startswith(prefix) or path.is_dir():
            continue
        host, _, rest = path.name[len(prefix):].rpartition("-")[0].rpartition("-")
        owner = fs.Owner(host, int(rest)) if rest.isdigit() else None
        if fs.is_abandoned(path, owner):
            with contextlib.suppress(OSError):
                path.unlink()


def export_gguf(source: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the model and tokenizer of ``source`` as the GGUF file ``out`` (see the module docstring)."""
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"--dtype {dtype!r} is not a GGUF type; use one of {', '.join(GGUF_DTYPES)}")
    gguf = _gguf()
    check_gguf_target(out, resolve_run(source, verify=False, warn=lambda _: None), overwrite)
    run = load_run(source, warn=_warn)
    files = RunFiles(run.weights_path, None, run.run_dir, run.checkpoint_dir)
    check_gguf_target(out, files, overwrite)
    model = run.model
    hf = _hyperparameters(model)
    dtype = dtype or _FROM_TORCH.get(model.embed_tokens.weight.dtype, "f32")
    out = Path(out)
    parent = Path(os.path.realpath(out)).parent
    parent.mkdir(parents=True, exist_ok=True)  # as the HF export makes its folder's parent
    owner = fs.Owner.this_process()
    tmp = parent / f".{out.name}{TEMP_MARK}{owner.host}-{owner.pid}-{next(_SERIAL)}"
    with fs.dir_lock(parent):
        _remove_abandoned(parent, out.name)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # never write through a link planted at the temp name
        _write(gguf, tmp, model, hf, run.tokenizer, dtype)
        fs.make_readable(tmp)
        with fs.dir_lock(parent):
            check_gguf_target(out, files, overwrite)  # another export may have put something there meanwhile
            fs.publish(tmp, parent / out.name)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and fs.write_errno(exc) is not None:
            raise GGUFExportError(fs.write_failure(exc, out)) from None
        raise
    return out


def _write(gguf: Any, path: Path, model: DecoderModel, hf: dict[str, Any], tokenizer: Tokenizer | None,
           dtype: str) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_dimension_count(hf["head_dim"])
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    writer.add_vocab_size(c.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is None:
        raise GGUFExportError("the run has no tokenizer to write into the GGUF file")
    _add_tokenizer(writer, tokenizer, c.vocab_size)
    for hf_name, tensor in _state_dict_to_hf(model).items():
        name = _gguf_name(hf_name)
        if name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = c.num_heads if ".attn_q." in name else c.num_kv_heads
            tensor = interleave_rotary(tensor, heads)
        _add_tensor(writer, gguf, name, tensor, dtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()  # also on a failed write: the temp file is removed next, with no handle left open on it
