"""A mixture-of-experts model with real weights, built from a dense Llama-style model (SmolLM2).

No real MoE checkpoint installs offline, so this one is made from the dense model's own MLPs and
saved as a stock Qwen2-MoE (Llama attention with ``qkv_bias=False``, a shared expert beside the
routed ones, softmax router with top-k renormalisation). Per layer, from the MLP's own channels:

* the ``shared`` channels that contribute most (mean |act·up| × ‖down column‖ on calibration
  text, or the weights' norms without text) form the shared expert, whose gate is zero
  (sigmoid 0.5) and whose down_proj is doubled;
* the others are split into E equal routed experts by balanced k-means on their co-activation
  (each channel's contributions over the calibration tokens; the gate/up rows without text);
  gate/up rows and down_proj columns split likewise, each expert's down_proj times top_k.

With top_k = E and a zero router every routed expert gets weight 1/E: the model computes the
dense model up to float rounding (the check of the conversion). With top_k < E and a router
fitted by least squares to predict each expert's output norm from the layer's input, it is a
genuine sparse MoE whose routing depends on the input; the router's logits are scaled to a root
mean square of :data:`LOGIT_RMS`, so the weights stay near 1/top_k and the output near the sum of
the chosen experts' parts. Only a share of the MLP runs per token, so the sparse model is worse
than the dense one (the bench prints both); SiLU MLPs do not split without loss, which is why
half the channels stay shared (measured on SmolLM2 with oracle routing, 4 x 512 Wikipedia
evaluation tokens: top-2 of 8 experts of 192 and no shared expert 3434; 768 shared + top-2 of 8
x 96 33.0; the same 960 channels fixed 64.5; dense 14.4).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llmprune.errors import LlmpruneError

log = logging.getLogger(__name__)

LOGIT_RMS = 0.25  # size of the fitted router's logits: the ranking is what it learns, weights stay mild
RIDGE = 1e-3  # relative ridge of the router's least-squares fit
SAMPLE_EVERY = 4  # calibration tokens kept per layer for the split and the fit: every 4th


def balanced_clusters(features: torch.Tensor, groups: int, iterations: int = 20, seed: int = 0) -> list[torch.Tensor]:
    """Split the rows of ``features`` (n, d) into ``groups`` equal clusters of similar rows
    (cosine k-means, each assignment filled greedily by similarity under equal capacities)."""
    n = features.shape[0]
    if n % groups:
        raise LlmpruneError(f"{n} channels do not split into {groups} equal experts")
    size = n // groups
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(n, generator=generator)[:groups]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        similarity = unit @ centroids.T  # (n, groups)
        order = similarity.flatten().argsort(descending=True)
        taken = torch.zeros(n, dtype=torch.bool)
        fill = [0] * groups
        for flat in order.tolist():
            row, group = divmod(flat, groups)
            if taken[row] or fill[group] == size:
                continue
            taken[row], assign[row] = True, group
            fill[group] += 1
        centroids = torch.stack([torch.nn.functional.normalize(unit[assign == g].mean(0), dim=0)
                                 for g in range(groups)])
    return [torch.nonzero(assign == g).flatten() for g in range(groups)]


@torch.no_grad()
def mlp_inputs(dense: Any, calibration: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """Every decoder layer's MLP input on ``calibration`` (every SAMPLE_EVERY-th token), fp32."""
    found: list[list[torch.Tensor]] = [[] for _ in dense.model.layers]

    def hook(index: int) -> Any:
        def pre(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            found[index].append(x[::SAMPLE_EVERY].float().clone())

        return pre

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(dense.model.layers)]
    try:
        for chunk in calibration.split(batch):
            dense(input_ids=chunk, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in found]


def _router(x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """(E, H) least-squares map from inputs x (T, H) to expert output norms (T, E), scaled so
    its logits have root mean square LOGIT_RMS."""
    xx = x.double().T @ x.double()
    ridge = RIDGE * xx.diagonal().mean()
    W = torch.linalg.solve(xx + ridge * torch.eye(xx.shape[0], dtype=xx.dtype), x.double().T @ norms.double()).T
    rms = (x.double() @ W.T).square().mean().sqrt().clamp_min(1e-12)
    return (W * (LOGIT_RMS / rms)).float()


@torch.no_grad()
def build_moe(dense: Any, experts: int = 8, top_k: int = 2, calibration: torch.Tensor | None = None,
              shared: int | None = None, seed: int = 0) -> Any:
    """The Qwen2-MoE model made from ``dense`` (a Llama-style causal LM). ``shared``: channels
    of the shared expert (default half the MLP). ``calibration`` (token ids) chooses the shared
    channels, groups the routed ones and fits the router; without it (only with ``top_k ==
    experts``) the router is zero and the split follows the weights."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = dense.config
    if getattr(config, "model_type", None) != "llama":
        raise LlmpruneError(f"the MoE test bed is built from a Llama-style model, got {config.model_type!r}")
    width = config.intermediate_size
    shared = width // 2 if shared is None else shared
    if not 1 <= top_k <= experts or (width - shared) % experts or not 0 <= shared < width:
        raise LlmpruneError(f"cannot split {width} channels into {shared} shared and {experts} routed experts "
                            f"with top_k {top_k}")
    if top_k < experts and calibration is None:
        raise LlmpruneError("a sparse test bed (top_k < experts) needs calibration text to fit its router")
    moe_config = Qwen2MoeConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=width,
        moe_intermediate_size=(width - shared) // experts, shared_expert_intermediate_size=shared,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, qkv_bias=False,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=getattr(config, "rope_parameters", None), tie_word_embeddings=config.tie_word_embeddings,
        use_sliding_window=False, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None))
    dtype = next(dense.parameters()).dtype
    moe = Qwen2MoeForCausalLM(moe_config).to(dtype)  # buffers (rotary) made here
    inputs = mlp_inputs(dense, calibration) if calibration is not None else None
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for index, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate, up, down = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                          mlp.down_proj.weight.detach())
        column = down.float().norm(dim=0)
        if inputs is not None:
            x = inputs[index]
            contribution = (mlp.act_fn(x @ gate.float().T) * (x @ up.float().T)).abs() * column  # (T, I)
            importance = contribution.mean(0)
        else:
            importance = gate.float().norm(dim=1) * up.float().norm(dim=1) * column
        order = importance.argsort(descending=True)
        kept, rest = order[:shared].sort().values, order[shared:]
        profile = contribution[:, rest].T if inputs is not None else torch.cat([gate[rest], up[rest]], dim=1)
        groups = [rest[g].sort().values for g in balanced_clusters(profile, experts, seed=seed + index)]
        prefix = f"model.layers.{index}.mlp."
        state[prefix + "shared_expert.gate_proj.weight"] = gate[kept]
        state[prefix + "shared_expert.up_proj.weight"] = up[kept]
        state[prefix + "shared_expert.down_proj.weight"] = down[:, kept] * 2  # its gate is sigmoid(0) = 0.5
        state[prefix + "shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size, dtype=dtype)
        state[prefix + "experts.gate_up_proj"] = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
        state[prefix + "experts.down_proj"] = torch.stack([down[:, g] * top_k for g in groups])
        router = torch.zeros(experts, config.hidden_size)
        if inputs is not None and top_k < experts:
            norms = torch.stack([(mlp.act_fn(x @ gate[g].float().T) * (x @ up[g].float().T)
                                  @ down[:, g].float().T).norm(dim=-1) for g in groups], dim=1)
            router = _router(x, norms)
        state[prefix + "gate.weight"] = router.to(dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise LlmpruneError(f"MoE test bed: weights do not match ({missing[:2]}, {unexpected[:2]})")
    moe.tie_weights()
    log.info("MoE test bed: %d shared channels, %d experts of %d, top-%d", shared, experts,
             (width - shared) // experts, top_k)
    return moe.eval()
