"""Parameter counts and FLOPs per token against a hand count of the tiny preset, dense and MoE."""

from __future__ import annotations

from llm.models import DecoderModel, active_parameters, flops_per_token, num_parameters
from llm.models.flops import attention_width

# DecoderModel.tiny(): vocab 256, hidden 32, 2 layers, 4 heads of 8 (2 KV heads), SwiGLU 64, MoE 4 experts of 32.
V, H, L, HEADS, HEAD_DIM, KV, INTER, E, K, I_MOE = 256, 32, 2, 4, 8, 2, 64, 4, 2, 32
ATTENTION = H * HEADS * HEAD_DIM + 2 * H * KV * HEAD_DIM + HEADS * HEAD_DIM * H  # q, k, v, o
NORMS = 2 * H  # two RMSNorms per block
SEQ = 16
ATTN_TERM = 12 * L * HEADS * HEAD_DIM * SEQ


def test_dense_counts():
    model = DecoderModel.tiny()
    block = ATTENTION + NORMS + 3 * H * INTER
    active = L * block + H + V * H  # blocks, final norm, output layer: the embedding is a lookup, not a matmul
    assert num_parameters(model) == model.num_parameters() == active + V * H
    assert active_parameters(model) == model.active_parameters() == active
    assert attention_width(model) == L * HEADS * HEAD_DIM
    assert flops_per_token(model, SEQ) == model.flops_per_token(SEQ) == 6 * active + ATTN_TERM == 172_992


def test_tied_output_layer_counts_once():
    model = DecoderModel.tiny(tie_embeddings=True)
    active = L * (ATTENTION + NORMS + 3 * H * INTER) + H + V * H
    assert num_parameters(model) == active  # the shared table once
    assert active_parameters(model) == active  # used as the output matmul, so it is active


def test_moe_counts_scale_routed_experts_by_top_k_over_experts():
    model = DecoderModel.tiny(use_moe=True)
    experts = E * (H * 2 * I_MOE + I_MOE * H)  # stacked gate/up and down of every expert
    router = H * E
    assert num_parameters(model) == L * (ATTENTION + NORMS + router + experts) + H + 2 * V * H
    active = L * (ATTENTION + NORMS + router + experts * K / E) + H + V * H
    assert active_parameters(model) == active
    assert flops_per_token(model, SEQ) == 6 * active + ATTN_TERM == 174_528


def _keep_local_experts(model: DecoderModel, rank: int, size: int) -> None:
    """What expert parallelism leaves on one rank: its `E / size` experts of every MoE layer (the layer's
    `num_experts` stays the whole layer's)."""
    from torch import nn

    from llm.models.moe import MoELayer

    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        for name in ("w_gate_up", "w_down"):
            full = getattr(layer, name).data
            local = full.shape[0] // size
            setattr(layer, name, nn.Parameter(full[rank * local:(rank + 1) * local].clone()))


def test_expert_parallel_rank_counts_the_whole_model():
    """Under EP each rank holds half the experts; its counts (and so MFU) are the whole model's, as in 1 process."""
    whole = DecoderModel.tiny(use_moe=True)
    counts = (num_parameters(whole), active_parameters(whole), flops_per_token(whole, SEQ))
    for rank in (0, 1):
        model = DecoderModel.tiny(use_moe=True)
        _keep_local_experts(model, rank, 2)
        assert model.layers[0].mlp.w_gate_up.shape[0] == E // 2
        assert (num_parameters(model), active_parameters(model), flops_per_token(model, SEQ)) == counts
