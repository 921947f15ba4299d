"""Frozen, validated configuration objects. Plain data only: no tensors, no runtime state."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

from llmprune.core.patterns import Pattern
from llmprune.engine.experts import EXPERT_STATISTICS, ExpertStatistics
from llmprune.engine.precision import PASS_DTYPES
from llmprune.errors import LlmpruneError
from llmprune.methods import METHODS, Options, get_method

DEFAULT_SPARSITY = 0.5  # unstructured pruning without a sparsity
SHRINK = 0.1  # a named method's Hessian shrinkage (the default recipe sets its own)
LOW_SHRINK = 0.1  # the default recipe's at 2:4 (N:M with M < 8, at 50% sparsity and below)
WIDE_SHRINK = 0.25  # the default recipe's at 4:8 (N:M with M >= 8, at 50% sparsity and below)
RIA_SHRINK = 0.4  # the default recipe's for RIA's mask at 50% unstructured sparsity and below
CG_ITERATIONS = 10  # conjugate-gradient steps of a named method's least-squares refit (--update admm)
DEFAULT_CG = 4  # the default recipe's: stopped early, the refit leans less on the calibration text
DEFAULT_TARGET = 0.3  # the default recipe's refit toward the dense model (model_target)
HIGH_SPARSITY = 0.7  # the default recipe adds OWL from here (measured at 70% only)
RECOVER_LR = 3e-3  # block-wise recovery's Adam step (README, "Recovery settings": 1e-4 barely moved the weights)
RECOVER_BATCH = 4  # calibration samples per recovery step: 32 samples give 7 steps an epoch and a held-out 4


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_recipe(pattern: Pattern, sparsity: float) -> dict[str, object]:
    """What a configuration that names no method gets: the best training-free recipe measured
    for the pattern and sparsity (README, "The default recipe"). Keys it sets itself win.

    * Unstructured below 70%: RIA's mask (:mod:`llmprune.methods.ria`), then the least-squares
      refit of its kept weights (``update`` admm: conjugate gradients from the masked weights),
      on the Hessian shrunk toward its diagonal by 0.4 at 50% and below, 0.1 above.
    * Unstructured from 70%: SparseGPT with OWL's layer sparsities, then the refit from
      SparseGPT's answer, shrink 0.1 (RIA's mask won off-domain there but lost more in-domain).
    * N:M: SparseGPT, then the refit, shrink 0.1 at 2:4 and 0.25 at 4:8 (M of 8 and more: a
      wider group leaves the update more freedom to over-fit the calibration text), 0.1 above
      50% (1:4, say). RIA's mask lost to SparseGPT's at 2:4 and 4:8.

    * The refit aims 0.3 of the way at the dense model's own outputs at each linear
      (``model_target``, :data:`DEFAULT_TARGET`; validation: −7% at 50%, −22% at 2:4, −50% at
      70% on the geometric mean), and the calibration passes run in bfloat16 where the device
      multiplies it natively (``pass_dtype`` "auto"), which pays for the pull's dense pass.
    * The refit stops after 4 conjugate-gradient steps (:data:`DEFAULT_CG`; a named method's
      runs 10): the weights stay nearer their start (SparseGPT's answer, RIA's masked weights),
      which won off-domain at 2:4, 60% and 70% (2:4 validation 117.50 -> 110.37 with pydoc) for
      less than it lost in-domain, and costs 60% less time. At 50% (0.45% on the mean) and 4:8
      (1.2%) 10 steps were a little better: 4 kept there for the time budget (1.5x SparseGPT's).

    Chosen on a validation text (Wikipedia bucket 4) by the geometric mean of its perplexity
    after calibration on pydoc (off-domain) and on the Wikipedia calibration split (in-domain),
    32 x 512 tokens each, a quarter of the windows written by the dense model (what the pipeline
    adds to the default recipe: :func:`llmprune.jobs.pipeline.generated_count`); where two were
    within 1%, the off-domain number decided. Only 50%,
    2:4, 4:8, 60% and 70% were measured; other settings take the nearest rule.
    """
    high = sparsity >= HIGH_SPARSITY - 1e-9
    if pattern.kind == "unstructured" and not high:
        # admm_iterations 0: from RIA's masked weights, conjugate gradients alone (as measured).
        return {"method": "ria", "update": "admm", "admm_iterations": 0, "refine": "none", "allocation": "uniform",
                "shrink": RIA_SHRINK if sparsity <= 0.5 + 1e-9 else SHRINK, "cg_iterations": DEFAULT_CG,
                "model_target": DEFAULT_TARGET, "pass_dtype": "auto"}
    shrink = SHRINK if sparsity > 0.5 + 1e-9 else WIDE_SHRINK if pattern.m >= 8 else LOW_SHRINK
    # admm_iterations stays None: 0 from SparseGPT's answer, 20 where a refinement moved the mask.
    return {"method": "sparsegpt", "update": "admm", "refine": "none",
            "allocation": "owl" if pattern.kind == "unstructured" and high else "uniform", "shrink": shrink,
            "cg_iterations": DEFAULT_CG, "model_target": DEFAULT_TARGET, "pass_dtype": "auto"}


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    * ``method``: ``magnitude``, ``wanda``, ``sparsegpt``, ``admm``, ``obd`` (½·F_qq·w_q², the
      diagonal empirical Fisher of the calibration loss) or ``taylor`` (|g_q·w_q|): the last two
      from gradients of the whole model's loss (:mod:`llmprune.methods.loss`); None (default): the default
      recipe for the pattern and sparsity (:func:`default_recipe`), which also fills in
      ``update``, ``refine``, ``allocation`` and ``shrink`` where they are not given.
    * ``pattern``: ``"unstructured"`` or ``"N:M"`` (N kept in every M consecutive weights).
    * ``sparsity``: fraction of zeros in [0, 1). ``None`` (default): the pattern's own for N:M
      (2:4 = 0.5, 1:4 = 0.75), 0.5 for unstructured.
    * ``group``: comparison group of unstructured masks, ``"row"``, ``"layer"`` or ``"global"``
      (every prunable weight of every decoder layer in one group, so layers end at different
      sparsities with the mean the target; for the methods whose scores are known before any
      layer is pruned: magnitude, obd, taylor) (default: the method's reference choice:
      magnitude and SparseGPT per layer, Wanda per row, OBD and Taylor global where they can be,
      else per layer).
    * ``method`` ``admm``: the mask is chosen inside ADMM least-squares iterations, its sparsity
      raised gradually (Boža 2024), then refit on its support.
    * ``update``: ``"obs"`` re-fits kept weights with SparseGPT's OBS update after any mask;
      ``"admm"`` solves the least-squares refit on the mask exactly (``admm_iterations`` of ADMM,
      default 20 from a plain mask and 0 from SparseGPT's own answer, then ``cg_iterations`` of
      conjugate gradients, default 10; the default recipe stops at 4, short of the exact
      answer on purpose); default: the method's own (``"obs"`` for
      SparseGPT, ``"admm"`` for ADMM), ``"none"`` otherwise.
    * ``model_target`` (0 to 1; default 0): the least-squares refit (``update="admm"``) fits
      each pruned linear's outputs on the pruned model's inputs X_p to (1 − t)·W·X_p + t·W·X_d,
      where X_d are the dense model's own inputs at that linear for the same tokens: t = 0 is
      the classic layer-wise objective, t = 1 also undoes what the earlier pruned linears
      changed (GPTAQ's asymmetric calibration, for a pruning refit). The cross statistic
      (X_d − X_p)ᵀX_p is shrunk as H's off-diagonal part is. Costs a dense forward of each
      layer, a second statistic as large as H, and the dense activations beside the pruned ones
      (in memory). The default recipe sets 0.3 (README, "The refit toward the dense model"),
      except with recovery, which already aims at the dense model's activations. Models with
      experts cannot pair tokens (the two models route them differently), so it is refused there
      when asked for, and the recipe's is dropped (logged).
    * ``pass_dtype``: the precision of the calibration passes through each decoder layer (the
      pruned model's, and the dense model's for ``model_target``): ``"float32"`` (a named
      method's default), ``"bfloat16"`` (the layer under autocast: its matrix products in
      bfloat16; statistics, solves and the cross statistic's sums in float32), or ``"auto"``:
      bfloat16 where the device multiplies it natively (a GPU of compute capability 8 or later;
      a CPU with AMX or AVX512-BF16), else float32 (:mod:`llmprune.engine.precision`). A 16-bit
      layer is left in its own dtype, with float32 statistics.
    * ``refine``: ``"dsnot"`` refines the chosen mask by DSnoT's prune-and-grow (at most
      ``dsnot_cycles`` swaps per row), keeping each row's count and N:M groups; the update then
      refits on the refined mask.
    * ``allocation``: ``"uniform"`` (every decoder layer at the target) or ``"owl"``: each
      layer's sparsity from its outlier ratio (the share of Wanda scores above ``owl_m`` × their
      mean, on the dense model), spread over ±``owl_lambda`` around the target with the mean
      over all pruned weights exactly the target (Yin et al. 2024); or ``"sensitivity"``: from
      the measured curves at ``sensitivity`` (a ``sensitivity.json`` of ``llmprune analyze
      sensitivity``, by layers), filled cheapest first with the same exact mean
      (:mod:`llmprune.engine.curves`). Unstructured only: every layer of an N:M checkpoint keeps
      N of every M.
    * ``recover``: ``"blockwise"`` trains each pruned decoder layer's kept weights (Adam,
      ``recover_epochs`` over the calibration batches at ``recover_lr``; with
      ``recover_schedule="cosine"`` the step falls to zero over each stage) to reproduce the
      dense model's outputs at that layer (``recover_target="model"``: the dense layers run on
      the dense model's own activations, carried beside the pruned ones; ``"layer"``: the dense
      layer on the pruned model's inputs), attention then MLP (the MLP alone, on its cached
      inputs, in ``recover_mlp_steps`` steps per batch of tokens shuffled across the batches; 0:
      the whole layer, a step per batch), zeros kept; kept only if the held-out
      calibration batch's error drops (with ``recover_keep="best"`` each stage ends on its best
      epoch by that error) (:mod:`llmprune.engine.recover`). A step per batch: with recovery on
      and no ``batch_size`` given, the forward batch is at most ``recover_batch`` samples, so the
      number of steps does not follow the device's memory (a GPU's auto batch holds all 32).
    * ``schedule``: iterative pruning (Han et al. 2015's prune-then-retrain, one layer at a time):
      each layer is pruned to these rising sparsities in turn (the last is the target), with
      recovery after each step when ``recover`` is on.
    * ``blocksize``, ``damp``: SparseGPT's lazy-update block width and dampening, as a fraction of
      mean(diag H).
    * ``shrink`` (default 0.1 for a named method; the default recipe sets its own): the OBS
      solve and the least-squares refit use (1 − shrink)·H + shrink·diag(H), shrinking the
      calibration inputs' correlations toward zero while keeping their variances. The update
      leans on those correlations, which few (or off-domain) calibration tokens estimate worst;
      0 is the plain SparseGPT Hessian, 1 leaves no update at all (a Wanda-like w²·H_jj mask).
    * ``nm_select``: how SparseGPT picks each N:M group: ``joint`` (default: the pruned set with
      the least OBS error of the group as a whole) or ``score`` (per-weight w²/[H⁻¹]_jj, as
      the reference code).
    * ``sequential`` (default True): true-sequential pruning inside a decoder layer: each group
      of linears that shares an input (q/k/v → o → gate/up → down) is pruned from inputs that
      already pass through the pruned earlier groups. False prunes every linear from the dense
      layer's statistics, as the reference implementations do.
    * ``allow_partial`` (default False): prune the linear layers even when the decoder layers
      also hold weight matrices no method can prune (fused mixture-of-experts weights); without
      it such a model is refused before any work. The report then gives both sparsities.
    * ``expert_statistics`` (mixture-of-experts layers): ``"routed"`` (default: each expert's
      statistics from the calibration tokens routed to it), ``"weighted"`` (the same, each token
      weighted by its routing weight, as MoE-Pruner) or ``"all"`` (every token, as if routed to
      every expert; the layer's output still uses only the routed ones: llm-compressor's
      calibrate-all-experts).
    * ``min_expert_tokens`` (default 32): an expert whose statistics come from fewer tokens than
      this (a starving expert) is pruned by magnitude at the same pattern and sparsity; the
      record lists each expert's tokens and every such fallback.
    """

    method: str | None = None
    pattern: str = "unstructured"
    sparsity: float | None = None
    group: Literal["row", "layer", "global"] | None = None
    update: Literal["none", "obs", "admm"] | None = None
    blocksize: int = 128
    damp: float = 0.01
    sequential: bool = True
    nm_select: Literal["joint", "score"] = "joint"
    shrink: float | None = None
    allow_partial: bool = False
    refine: Literal["none", "dsnot"] | None = None
    allocation: Literal["uniform", "owl", "sensitivity"] | None = None
    sensitivity: str | None = None  # allocation "sensitivity": the sensitivity.json of the curves
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    admm_iterations: int | None = None
    cg_iterations: int | None = None
    model_target: float | None = None
    pass_dtype: Literal["auto", "float32", "bfloat16"] | None = None
    dsnot_cycles: int = 50
    recover: Literal["none", "blockwise"] | None = None
    recover_epochs: int = 2
    recover_lr: float = RECOVER_LR
    recover_batch: int = RECOVER_BATCH
    recover_schedule: Literal["constant", "cosine"] = "constant"
    recover_keep: Literal["last", "best"] = "last"
    recover_target: Literal["model", "layer"] = "model"
    recover_mlp_steps: int = 2
    schedule: tuple[float, ...] | None = None
    expert_statistics: ExpertStatistics = "routed"
    min_expert_tokens: int = 32

    def __post_init__(self) -> None:
        pattern = Pattern.parse(self.pattern)
        # Not a field (records and recipes keep the filled-in method): the pipeline asks it
        # whether the default recipe runs (its self-generated calibration windows).
        object.__setattr__(self, "_default", self.method is None)
        object.__setattr__(self, "_recipe_target", False)
        if self.method is None:  # the default recipe, for what the caller left unsaid
            target = pattern.implied_sparsity
            if target is None and isinstance(self.sparsity, (int, float)):
                target = self.sparsity
            if target is None and self.schedule and isinstance(self.schedule[-1], (int, float)):
                target = self.schedule[-1]  # no sparsity: the schedule's end is the target
            if target is None:
                target = DEFAULT_SPARSITY
            recipe = default_recipe(pattern, float(target))
            if self.recover == "blockwise":
                # Recovery toward the dense model already undoes the error the earlier pruned
                # layers passed on: the refit's pull added nothing there (README), only time.
                recipe["model_target"] = 0.0
            # The recipe's pull, not the caller's: a model with experts (no token pairs) drops it.
            object.__setattr__(self, "_recipe_target", self.model_target is None and bool(recipe["model_target"]))
            for key, value in recipe.items():
                if getattr(self, key) is None:
                    object.__setattr__(self, key, value)
        if self.shrink is None:
            object.__setattr__(self, "shrink", SHRINK)
        if self.refine is None:
            object.__setattr__(self, "refine", "none")
        if self.allocation is None:
            object.__setattr__(self, "allocation", "uniform")
        if self.cg_iterations is None:
            object.__setattr__(self, "cg_iterations", CG_ITERATIONS)
        if self.model_target is None:
            object.__setattr__(self, "model_target", 0.0)
        if self.pass_dtype is None:
            object.__setattr__(self, "pass_dtype", "float32")
        method = get_method(self.method_name)
        implied = pattern.implied_sparsity
        if self.sparsity is None:
            pass
        elif not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity)
                  and 0 <= self.sparsity < 1):
            raise LlmpruneError(f"sparsity must be in [0, 1) (the fraction of zeros), got {self.sparsity}")
        elif implied is not None and abs(implied - self.sparsity) > 1e-9:
            raise LlmpruneError(
                f"pattern {pattern} keeps {pattern.n} of every {pattern.m} weights (sparsity "
                f"{implied:g}), which contradicts sparsity {self.sparsity:g}"
            )
        if self.group not in (None, "row", "layer", "global"):
            raise LlmpruneError(f"group must be 'row', 'layer' or 'global', got {self.group!r}")
        if self.group == "global":
            if method.saliency is None:
                known = ", ".join(m.name for m in METHODS.values() if m.saliency is not None)
                raise LlmpruneError(f"group 'global' ranks every weight of the model before any is pruned, which "
                                    f"{method.name}'s scores (made from pruned layers' inputs) cannot; use {known}")
            if pattern.kind == "nm":
                raise LlmpruneError(f"group 'global' varies the sparsity by matrix, which pattern {pattern} fixes")
            if self.allocation not in (None, "uniform"):
                raise LlmpruneError(f"group 'global' sets every layer's sparsity itself; drop allocation "
                                    f"{self.allocation!r}")
            if self.schedule is not None:
                raise LlmpruneError("group 'global' prunes in one step; drop schedule")
        if self.update not in (None, "none", "obs", "admm"):
            raise LlmpruneError(f"update must be 'none', 'obs' or 'admm', got {self.update!r}")
        if method.always_updates and self.update == "none":
            raise LlmpruneError(f"{method.name} always updates the kept weights ({method.own_update}); "
                                "drop update='none'")
        if not (_number(self.model_target) and 0 <= self.model_target <= 1):  # type: ignore[operator]
            raise LlmpruneError(f"model_target must be in [0, 1] (0: the classic layer-wise refit), got "
                                f"{self.model_target!r}")
        if self.model_target and (self.update or method.own_update) != "admm" and self.recipe_target:
            object.__setattr__(self, "model_target", 0.0)  # the recipe's pull needs the refit the caller turned off
            object.__setattr__(self, "_recipe_target", False)
        if self.model_target and (self.update or method.own_update) != "admm":
            raise LlmpruneError(f"model_target moves the least-squares refit's target; it needs update 'admm', "
                                f"got {self.update or method.own_update or 'none'!r}")
        if self.pass_dtype not in (None, *PASS_DTYPES):
            raise LlmpruneError(f"pass_dtype must be one of {', '.join(PASS_DTYPES)}, got {self.pass_dtype!r}")
        if self.refine not in (None, "none", "dsnot"):
            raise LlmpruneError(f"refine must be 'none' or 'dsnot', got {self.refine!r}")
        if self.allocation not in (None, "uniform", "owl", "sensitivity"):
            raise LlmpruneError(f"allocation must be 'uniform', 'owl' or 'sensitivity', got {self.allocation!r}")
        if (self.allocation == "sensitivity") != (self.sensitivity is not None):
            raise LlmpruneError("allocation 'sensitivity' reads its curves from sensitivity (--sensitivity "
                                "PATH/sensitivity.json, from `llmprune analyze sensitivity`); give both or neither")
        if self.sensitivity is not None and not (isinstance(self.sensitivity, str) and self.sensitivity.strip()):
            raise LlmpruneError(f"sensitivity must be the path of a sensitivity.json, got {self.sensitivity!r}")
        if self.allocation in ("owl", "sensitivity") and pattern.kind == "nm":
            raise LlmpruneError(f"allocation {self.allocation!r} varies the sparsity by layer, which pattern {pattern} "
                                "fixes at "
                                f"{pattern.n} of every {pattern.m} in every layer; use an unstructured sparsity")
        if not (_number(self.owl_m) and math.isfinite(self.owl_m) and self.owl_m > 0):
            raise LlmpruneError(f"owl_m must be a positive multiple of the mean score, got {self.owl_m}")
        if not (_number(self.owl_lambda) and 0 <= self.owl_lambda < 1):
            raise LlmpruneError(f"owl_lambda must be in [0, 1) (the spread of layer sparsities), got {self.owl_lambda}")
        if self.schedule is not None:
            steps = self.schedule
            if not (isinstance(steps, (tuple, list)) and steps and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1 for x in steps)):
                raise LlmpruneError(f"schedule must be sparsities in (0, 1), e.g. 0.3,0.5,0.7; got {steps!r}")
            if any(b <= a for a, b in itertools.pairwise(steps)):
                raise LlmpruneError(f"schedule must rise step by step, got {list(steps)}")
            if pattern.kind == "nm":
                raise LlmpruneError(f"schedule prunes in steps of sparsity; pattern {pattern} has one step only")
            if self.sparsity is not None and abs(steps[-1] - self.sparsity) > 1e-9:
                raise LlmpruneError(f"schedule ends at {steps[-1]:g}, but sparsity is {self.sparsity:g}; "
                                    "end it at the target")
            object.__setattr__(self, "schedule", tuple(float(x) for x in steps))
        if self.recover not in (None, "none", "blockwise"):
            raise LlmpruneError(f"recover must be 'none' or 'blockwise', got {self.recover!r}")
        if not (_number(self.recover_lr) and math.isfinite(self.recover_lr) and self.recover_lr > 0):
            raise LlmpruneError(f"recover_lr must be a positive learning rate, got {self.recover_lr}")
        if self.recover_schedule not in ("constant", "cosine"):
            raise LlmpruneError(f"recover_schedule must be 'constant' or 'cosine', got {self.recover_schedule!r}")
        if self.recover_keep not in ("last", "best"):
            raise LlmpruneError(f"recover_keep must be 'last' or 'best', got {self.recover_keep!r}")
        if self.recover_target not in ("model", "layer"):
            raise LlmpruneError(f"recover_target must be 'model' or 'layer', got {self.recover_target!r}")
        for key, least in (("admm_iterations", 0), ("cg_iterations", 0), ("dsnot_cycles", 0),
                           ("recover_epochs", 0), ("recover_batch", 1), ("recover_mlp_steps", 0),
                           ("min_expert_tokens", 0)):
            value = getattr(self, key)
            if value is None and key == "admm_iterations":
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                raise LlmpruneError(f"{key} must be a whole number >= {least}, got {value!r}")
        if self.expert_statistics not in EXPERT_STATISTICS:
            raise LlmpruneError(f"expert_statistics must be one of {', '.join(EXPERT_STATISTICS)}, got "
                                f"{self.expert_statistics!r}")
        if self.expert_statistics == "weighted" and self.refine == "dsnot":
            raise LlmpruneError("router-weighted expert statistics scale second moments only; DSnoT reads input "
                                "means and variances too: use expert_statistics 'routed' with refine 'dsnot'")
        if not (isinstance(self.blocksize, int) and self.blocksize > 0):
            raise LlmpruneError(f"blocksize must be a positive integer, got {self.blocksize}")
        if not (math.isfinite(self.damp) and self.damp > 0):
            raise LlmpruneError(f"damp must be a positive fraction of mean(diag H), got {self.damp}")
        # isinstance spelled out (not _number) so the type checker knows shrink is a number here.
        if not (isinstance(self.shrink, (int, float)) and not isinstance(self.shrink, bool)
                and 0 <= self.shrink <= 1):
            raise LlmpruneError(f"shrink must be in [0, 1] (0: the plain Hessian), got {self.shrink}")
        if self.nm_select not in ("joint", "score"):
            raise LlmpruneError(f"nm_select must be 'joint' or 'score', got {self.nm_select!r}")

    @property
    def recipe_target(self) -> bool:
        """Whether ``model_target`` is the default recipe's, not the caller's."""
        return bool(getattr(self, "_recipe_target", False))

    @property
    def uses_default(self) -> bool:
        """Whether no method was named, so :func:`default_recipe` chose it."""
        return bool(getattr(self, "_default", False))

    @property
    def method_name(self) -> str:
        """The method (after the default recipe filled it in)."""
        assert self.method is not None
        return self.method

    @property
    def target_sparsity(self) -> float:
        implied = Pattern.parse(self.pattern).implied_sparsity
        if implied is not None:
            return implied
        if self.sparsity is None and self.schedule:
            return float(self.schedule[-1])
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    def options(self) -> Options:
        """The per-matrix options handed to the method."""
        method = get_method(self.method_name)
        update = self.update or method.own_update or "none"
        pattern = Pattern.parse(self.pattern)
        group = self.group or method.default_group
        if group == "global" and self.group is None and (
                pattern.kind == "nm" or self.allocation not in (None, "uniform") or self.schedule):
            group = "layer"  # the default cannot be global here; an explicit one was refused
        return Options(
            pattern=pattern,
            sparsity=self.target_sparsity,
            group=group,
            update=update,
            blocksize=self.blocksize,
            damp=self.damp,
            nm_select=self.nm_select,
            shrink=float(self.shrink or 0.0),
            refine=self.refine or "none",
            admm_iterations=self.admm_iterations,
            cg_iterations=CG_ITERATIONS if self.cg_iterations is None else self.cg_iterations,
            model_target=float(self.model_target or 0.0),
            dsnot_cycles=self.dsnot_cycles,
        )


@dataclass(frozen=True)
class CalibrationConfig:
    """``source``: a built-in text (``wikipedia``, ``pydoc``), a datasets name (``wikitext2``,
    ``c4``, ``ptb``) or a local ``.txt``/``.jsonl`` file. ``seqlen`` None = min(2048, model limit).
    ``generated``: how many of the windows the dense model writes itself from their first tokens
    (:mod:`llmprune.io.generated`); None = the default, a quarter of them when the default recipe
    prunes a model held in memory, none otherwise (see :func:`llmprune.jobs.pipeline.generated_count`)."""

    source: str = "wikipedia"
    samples: int = 128
    seqlen: int | None = None
    seed: int = 0
    generated: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.samples, int) and self.samples > 0):
            raise LlmpruneError(f"calibration samples must be a positive integer, got {self.samples}")
        if self.seqlen is not None and not (isinstance(self.seqlen, int) and self.seqlen > 1):
            raise LlmpruneError(f"seqlen must be an integer > 1, got {self.seqlen}")
        if self.generated is not None:
            if not (isinstance(self.generated, int) and not isinstance(self.generated, bool) and self.generated >= 0):
                raise LlmpruneError(f"calibration generated must be an integer >= 0, got {self.generated!r}")
            if self.generated > self.samples:
                raise LlmpruneError(f"calibration generated={self.generated} is more than the {self.samples} "
                                    "calibration samples")
