"""Tiny random models and a tiny tokenizer for offline tests.

Every model is built from its real transformers config class (a few thousand parameters per
layer), seeded, float32, in eval mode. Widths are multiples of 8 so 2:4 and 4:8 divide every
linear's input width, except in :func:`awkward_llama`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VOCAB = 400  # the size the tiny tokenizer is trained to
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 128
SLIDING_WINDOW = 16  # Gemma 3 test sequences are longer, so the sliding mask differs from the full one
# Larger than transformers' 0.02 so attention is far from uniform and masks change the outputs.
INIT_RANGE = 0.2
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK, BOS, EOS, PAD = range(4)


def _finish(model: nn.Module, seed: int) -> nn.Module:
    # transformers initialises biases to 0 and norm weights to 1 (Gemma: 0); jitter every
    # parameter so a test that compares them before and after pruning compares real values.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.float().eval()


def _common(vocab_size: int) -> dict:
    return {"vocab_size": vocab_size, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}


def llama(vocab_size: int = VOCAB, seed: int = 0, intermediate_size: int = INTERMEDIATE,
          layers: int = LAYERS) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT_RANGE, **_common(vocab_size),
    )
    return _finish(LlamaForCausalLM(config), seed)


def awkward_llama(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    """down_proj's input width is 100: divisible by 4 (2:4 works) but not by 8 (4:8 must fail)."""
    return llama(vocab_size, seed, intermediate_size=100)


def mistral(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
        sliding_window=None, initializer_range=INIT_RANGE, **_common(vocab_size),
    )
    return _finish(MistralForCausalLM(config), seed)


def qwen2(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT_RANGE, tie_word_embeddings=False, **_common(vocab_size),
    )
    model = _finish(Qwen2ForCausalLM(config), seed)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # the point of testing Qwen2
    return model


def gemma3(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=3,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
        query_pre_attn_scalar=HIDDEN // HEADS, max_position_embeddings=MAX_POSITIONS,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        initializer_range=INIT_RANGE, **_common(vocab_size),
    )
    return _finish(Gemma3ForCausalLM(config), seed)


def opt(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POSITIONS, init_std=INIT_RANGE,
        dropout=0.0, attention_dropout=0.0, **_common(vocab_size),
    )
    return _finish(OPTForCausalLM(config), seed)


def gpt2(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POSITIONS,
        initializer_range=INIT_RANGE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        **_common(vocab_size),
    )
    return _finish(GPT2LMHeadModel(config), seed)


def phi3(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE,
        **_common(vocab_size),
    )
    return _finish(Phi3ForCausalLM(config), seed)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "llama": llama, "mistral": mistral, "qwen2": qwen2, "gemma3": gemma3,
    "opt": opt, "gpt2": gpt2, "phi3": phi3,
}
# Where each family keeps its decoder layers (read off the transformers source, not from llmprune).
LAYERS_PATH = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
    "gemma3": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h",
    "phi3": "model.layers",
}


def random_ids(nsamples: int, seqlen: int, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (nsamples, seqlen), generator=gen)


def pydoc_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics.values())


def train_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained on Python's pydoc topics, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([pydoc_text()], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    assert [wrapped.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [UNK, BOS, EOS, PAD]
    return wrapped


def decoder_linears(model: nn.Module, layers_path: str) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D inside the decoder layers, by full dotted name (independent of
    llmprune's own discovery, so the two can be compared)."""
    from transformers.pytorch_utils import Conv1D

    return {
        name: module for name, module in model.named_modules()
        if name.startswith(layers_path + ".") and isinstance(module, (nn.Linear, Conv1D))
    }


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): Conv1D stores (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.T if isinstance(module, Conv1D) else module.weight


# --- mixture-of-experts families ---------------------------------------------------------------
# Each with 8 experts of width MOE_INTERMEDIATE, top-2 routing, fused 3-D expert weights
# (transformers 5). Their router and expert layouts, read off the transformers sources:
# Mixtral/Qwen3-MoE/OLMoE plain; Qwen2-MoE with a shared expert and its 1-row gate; DeepSeek-V3
# with a dense first layer, a shared expert and a router bias buffer; gpt-oss transposed,
# interleaved gate/up, biases everywhere; Llama 4 pre-routed (every token to every expert, scaled
# by a sigmoid router score), transposed, with a shared expert, chunked attention in one layer.
EXPERTS = 8
TOP_K = 2
MOE_INTERMEDIATE = 32


def _moe_common() -> dict:
    return {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "max_position_embeddings": MAX_POSITIONS,
            "initializer_range": INIT_RANGE, "num_experts_per_tok": TOP_K}


def mixtral(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(intermediate_size=MOE_INTERMEDIATE, num_local_experts=EXPERTS, sliding_window=None,
                           **_moe_common(), **_common(vocab_size))
    return _finish(MixtralForCausalLM(config), seed)


def qwen2_moe(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(intermediate_size=INTERMEDIATE, moe_intermediate_size=MOE_INTERMEDIATE,
                            shared_expert_intermediate_size=INTERMEDIATE, num_experts=EXPERTS,
                            **_moe_common(), **_common(vocab_size))
    return _finish(Qwen2MoeForCausalLM(config), seed)


def qwen3_moe(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(intermediate_size=INTERMEDIATE, moe_intermediate_size=MOE_INTERMEDIATE,
                            num_experts=EXPERTS, head_dim=HIDDEN // HEADS, **_moe_common(), **_common(vocab_size))
    return _finish(Qwen3MoeForCausalLM(config), seed)


def olmoe(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    config = OlmoeConfig(intermediate_size=MOE_INTERMEDIATE, num_experts=EXPERTS, **_moe_common(),
                         **_common(vocab_size))
    return _finish(OlmoeForCausalLM(config), seed)


def deepseek_v3(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(
        intermediate_size=INTERMEDIATE, moe_intermediate_size=MOE_INTERMEDIATE, n_routed_experts=EXPERTS,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **_moe_common(), **_common(vocab_size))
    config.num_hidden_layers = 3  # a dense first layer, then two MoE layers
    return _finish(DeepseekV3ForCausalLM(config), seed)


def gpt_oss(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(intermediate_size=MOE_INTERMEDIATE, num_local_experts=EXPERTS, head_dim=HIDDEN // HEADS,
                          sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"],
                          **_moe_common(), **_common(vocab_size))
    return _finish(GptOssForCausalLM(config), seed)


def llama4(vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    # no_rope_layers: 1 = RoPE with chunked attention (layer 0), 0 = NoPE with full attention.
    config = Llama4TextConfig(intermediate_size=MOE_INTERMEDIATE, intermediate_size_mlp=INTERMEDIATE,
                              num_local_experts=EXPERTS, head_dim=HIDDEN // HEADS, no_rope_layers=[1, 0],
                              attention_chunk_size=SLIDING_WINDOW, **_moe_common(), **_common(vocab_size))
    return _finish(Llama4ForCausalLM(config), seed)


MOE_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe,
    "deepseek_v3": deepseek_v3, "gpt_oss": gpt_oss, "llama4": llama4,
}
