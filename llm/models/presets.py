"""The catalogue of named model shapes: ``--model-preset NAME``, ``DecoderModel.from_preset(NAME, **overrides)``.

Data only (litgpt's ``config.py`` catalogue): each entry is a set of :class:`~llm.models.config.ModelConfig` field
values, the total parameter count that ``DecoderModel`` builds from them (tests check every count exactly, on the
meta device), the tokenizer the vocabulary was made for (``byte`` or a Hugging Face repo id) and a note. The real
models' shapes are those of their Hugging Face ``config.json``; their counts are the original models' counts.

A preset's ``vocab_size`` belongs to its tokenizer: the ``lm`` task keeps it only when the run's tokenizer has that
many ids (the preset's own ``tokenizer.json``), otherwise the vocabulary follows the run's tokenizer. This module
imports nothing of the model (``config.py`` builds configs from it), so it stays at the bottom of ``llm.models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Preset:
    """One named shape: ModelConfig field values, DecoderModel's total parameter count, tokenizer, note."""

    fields: dict[str, Any]
    parameters: int  # total parameters of DecoderModel(**fields), tied weights counted once
    tokenizer: str  # what vocab_size was made for: "byte", a Hugging Face repo id, or none (benchmarks)
    note: str = ""


# The shape tests use (DecoderModel.tiny(), the `tiny` and `debug-moe` presets): the one definition of it.
TINY: dict[str, Any] = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, max_seq_len=128, num_experts=4, top_k=2, moe_intermediate_size=32)

# Llama 3.1+'s rope scaling beside its factor (32 for the 3.2 models, 8 for 3.1): HF's rope_parameters values.
LLAMA3_ROPE: dict[str, Any] = dict(rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                   rope_original_max_seq_len=8192)

PRESETS: dict[str, Preset] = {
    # ------------------------------------------------------------------ small shapes for tests and smoke runs
    "tiny": Preset(
        dict(TINY),
        parameters=34_976, tokenizer="byte",
        note="the shape tests use (DecoderModel.tiny()): GQA 4 heads / 2 KV heads, 2 layers; its MoE fields are "
             "set for --model-use-moe",
    ),
    "debug-moe": Preset(
        dict(TINY, use_moe=True),
        parameters=47_520, tokenizer="byte",
        note="tiny with a Mixture-of-Experts MLP in every block (4 experts of width 32, top-2)",
    ),
    # ------------------------------------------------------- the GPU check's shapes (benchmarks/gpu_check.sh)
    "byte-125m": Preset(
        dict(vocab_size=256, hidden_size=768, num_layers=18, num_heads=12, intermediate_size=2048,
             max_seq_len=2048),
        parameters=127_823_616, tokenizer="byte",
        note="dense ~128M on byte tokens: 18 blocks of 7.08M (hidden 768, 12 heads, SwiGLU 2048)",
    ),
    "byte-moe-480m": Preset(
        dict(vocab_size=256, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048,
             max_seq_len=2048, use_moe=True, num_experts=8, top_k=2, moe_intermediate_size=2048),
        parameters=481_782_528, tokenizer="byte",
        note="MoE on byte tokens: 12 blocks, 8 experts of width 2048, top-2 (about 150M active per token)",
    ),
    # ------------------------------------- the side-by-side shapes of benchmarks/bench_model.py (ours vs HF)
    "bench-256": Preset(
        dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688,
             max_seq_len=256),
        parameters=7_096_576, tokenizer="none (random token ids)",
        note="small Llama shape compared with HF LlamaForCausalLM: hidden 256, 4 layers, GQA 8/4 heads, SwiGLU 688",
    ),
    "bench-256-moe": Preset(
        dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688,
             max_seq_len=256, use_moe=True, num_experts=8, top_k=2, moe_intermediate_size=688),
        parameters=21_899_520, tokenizer="none (random token ids)",
        note="bench-256 with 8 experts of width 688, top-2, compared with HF MixtralForCausalLM",
    ),
    "bench-moe-2048": Preset(
        dict(vocab_size=32000, hidden_size=2048, num_layers=4, num_heads=16, num_kv_heads=8, intermediate_size=5632,
             max_seq_len=2048, use_moe=True, num_experts=8, top_k=2, moe_intermediate_size=5632),
        parameters=1_288_783_872, tokenizer="none (random token ids)",
        note="Mixtral-like MoE scaled to one GPU (hidden 2048, 8 experts of 5632, top-2, 4 blocks): the MoE MFU "
             "shape of benchmarks/gpu_check.sh, compared with HF MixtralForCausalLM",
    ),
    # ------------------------------------------------------------------- real models (HF config.json shapes)
    "smollm2-135m": Preset(
        dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
             max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
        parameters=134_515_008, tokenizer="HuggingFaceTB/SmolLM2-135M",
        note="SmolLM2-135M (Llama architecture, tied embeddings)",
    ),
    "tinyllama-1.1b": Preset(
        dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632,
             max_seq_len=2048, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False),
        parameters=1_100_048_384, tokenizer="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        note="TinyLlama 1.1B (Llama 2 architecture and tokenizer)",
    ),
    "llama-3.2-1b": Preset(
        dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
             max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True, **LLAMA3_ROPE,
             rope_factor=32.0),
        parameters=1_235_814_400, tokenizer="meta-llama/Llama-3.2-1B",
        note="Llama 3.2 1B, tied embeddings, 'llama3' rope scaling (factor 32 over an original 8192 context)",
    ),
    "llama-3.1-8b": Preset(
        dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
             intermediate_size=14336, max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False,
             **LLAMA3_ROPE, rope_factor=8.0),
        parameters=8_030_261_248, tokenizer="meta-llama/Llama-3.1-8B",
        note="Llama 3.1 8B, 'llama3' rope scaling (factor 8 over an original 8192 context)",
    ),
    "qwen2.5-0.5b": Preset(
        dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
             max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, qkv_bias=True,
             hf_architecture="Qwen2ForCausalLM"),
        parameters=494_032_768, tokenizer="Qwen/Qwen2.5-0.5B",
        note="Qwen2.5 0.5B: biases on q/k/v, tied embeddings; exported as Qwen2ForCausalLM",
    ),
    "qwen3-0.6b": Preset(
        dict(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_size=128,
             intermediate_size=3072, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True,
             qk_norm=True, hf_architecture="Qwen3ForCausalLM"),
        parameters=596_049_920, tokenizer="Qwen/Qwen3-0.6B",
        note="Qwen3 0.6B: per-head QK-norm, 16 heads of width 128 (wider than 1024 / 16), tied embeddings (the Hub's "
             "751,632,384 counts the tied matrix twice, as its file stores it); exported as Qwen3ForCausalLM",
    ),
    "mixtral-8x7b": Preset(
        dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
             max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5, tie_embeddings=False, use_moe=True, num_experts=8,
             top_k=2, moe_intermediate_size=14336),
        parameters=46_702_792_704, tokenizer="mistralai/Mixtral-8x7B-v0.1",
        note="Mixtral 8x7B: 8 experts of width 14336 per block, top-2, router without bias",
    ),
    "mistral-7b-v0.3": Preset(
        dict(vocab_size=32768, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
             max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5, tie_embeddings=False,
             hf_architecture="MistralForCausalLM"),
        parameters=7_248_023_552, tokenizer="mistralai/Mistral-7B-v0.3",
        note="Mistral 7B v0.3: Llama's blocks with GQA 32/8 heads; its config has no sliding window (v0.1's was 4096, "
             "--model-sliding-window 4096), and it exports as MistralForCausalLM",
    ),
    "qwen3-30b-a3b": Preset(
        dict(vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_size=128,
             intermediate_size=6144, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=False,
             qk_norm=True, use_moe=True, num_experts=128, top_k=8, moe_intermediate_size=768,
             moe_norm_topk_prob=True, hf_architecture="Qwen3MoeForCausalLM"),
        parameters=30_532_122_624, tokenizer="Qwen/Qwen3-30B-A3B",
        note="Qwen3 30B-A3B: 128 fine-grained experts of width 768 per block, top-8 (about 3.3B active per token), "
             "Qwen3's QK-norm and 128-wide heads; exported as Qwen3MoeForCausalLM",
    ),
}


def get_preset(name: str) -> Preset:
    """The catalogue entry ``name``; an unknown name is a ConfigError listing the names and the closest one."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"model.preset: unknown preset {name!r}; valid: {', '.join(PRESETS)}{did_you_mean(name, PRESETS)}"
        ) from None
