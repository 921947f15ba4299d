"""RIA, relative importance and activations (Zhang et al. 2024, "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models", ICLR 2024), compared within each output
row as Wanda is:

    score_ij = (|W_ij| / Σ_k |W_ik|  +  |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^a,   a = 1/2.

A weight is judged against the rest of its output row *and* of its input column, so an input
that every row reads weakly keeps its strongest weights instead of losing the whole column (which
Wanda's |W|·‖X‖ tends to do); the square root tempers the few outlier channels whose norms
dominate Wanda's score.

Worked example: W = [[4, 1], [4, 3]], ‖X‖ = [1, 1]. Row sums 5, 7; column sums 8, 4; scores
[[4/5 + 4/8, 1/5 + 1/4], [4/7 + 4/8, 3/7 + 3/4]] = [[1.3, 0.45], [1.071, 1.179]], so at 50% per
row W becomes [[4, 0], [0, 3]], where Wanda (and magnitude) keep [[4, 0], [4, 0]] and leave input
1 unread. With ‖X‖ = [4, 1] the factors are [2, 1] and row 1 keeps column 0 as well.
"""

from __future__ import annotations

import torch

from llmprune.methods.base import COLUMN_NORMS, Options, Result, Stats
from llmprune.methods.wanda import prune_by

ACTIVATION_POWER = 0.5  # the paper's a


def scores(W: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """RIA's score of every weight. W: (out, in); column_norms: (in,) the inputs' ‖X_j‖₂."""
    A = W.abs().float()
    tiny = torch.finfo(A.dtype).tiny  # an all-zero row or column scores 0, not NaN
    relative = A / A.sum(1, keepdim=True).clamp_min(tiny) + A / A.sum(0, keepdim=True).clamp_min(tiny)
    return relative * column_norms.float()[None, :].pow(ACTIVATION_POWER)


def prune(W: torch.Tensor, stats: Stats, options: Options) -> Result:
    return prune_by(scores(W, stats[COLUMN_NORMS]), W, stats, options)
