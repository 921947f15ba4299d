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
