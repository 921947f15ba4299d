"""The model card (README.md) of a pruned checkpoint: the facts of llmprune.json in tables."""

from __future__ import annotations

import itertools
import math
import shlex
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.io.data import SPLIT_SOURCES
from llmprune.io.export import read_analysis
from llmprune.io.generated import PREFIX, piece_bounds


def model_card(record: dict[str, Any]) -> str:
    method, pattern = record["method"], record["pattern"]
    tags = ["llmprune", "pruned", method, "sparse"] + (["n:m-sparsity"] if ":" in pattern else [])
    base = record["base_model"]
    lines = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if "/" in base and not base.startswith((".", "/")):
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {base}: {method} {pattern}, {record['sparsity_achieved']:.1%} sparse", ""]
    lines += [
        f"Pruned with llmprune {record['llmprune_version']}. "
        "The weights are dense safetensors with exact zeros; stock `transformers` loads them.", "",
        "| | |", "|---|---|",
        f"| base model | {record['base_model_description']} |",
        f"| architecture | {record['architecture']} |",
        f"| method | {method} (update: {record['resolved_options']['update']}, "
        f"sequential: {record['config']['sequential']}"
        + (f", damp: {record['resolved_options']['damp']:g}, shrink: {record['resolved_options'].get('shrink', 0):g}"
           if record["resolved_options"]["update"] in ("obs", "admm") else "")
        + (f", {record['resolved_options']['cg_iterations']} conjugate-gradient steps"
           if record["resolved_options"]["update"] == "admm" and "cg_iterations" in record["resolved_options"]
           else "") + ") |",
        f"| pieces | {pieces_line(record)} |",
        f"| pattern | {pattern}" + (" (N kept in every M)" if ":" in pattern else "") + " |",
        f"| sparsity of the decoder layers' weights | target {record['sparsity_target']:.1%}, "
        f"achieved {record['sparsity_achieved']:.2%} |",
    ]
    if record.get("unpruned_weights"):
        lines.append(f"| not pruned | {len(record['unpruned_weights'])} weight matrices that are not linear layers "
                     f"(e.g. {record['unpruned_weights'][0]}); the pruned linears are "
                     f"{record['sparsity_of_pruned_linears']:.2%} sparse |")
    experts = record.get("experts")
    if experts:
        containers = experts["containers"]
        counts = [len(c["tokens"]) for c in containers.values()]
        starving = sum(len(c["magnitude_fallback"]) for c in containers.values())
        how = {"routed": "the tokens routed to each",
               "weighted": "the tokens routed to each, weighted by routing weight",
               "all": "every calibration token (calibrate-all-experts)"}[experts["statistics"]]
        lines.append(f"| experts | {len(containers)} MoE layers, {min(counts)}–{max(counts)} experts each, "
                     f"every expert pruned from its own statistics ({how}); {starving} with fewer than "
                     f"{experts['min_tokens']} tokens pruned by magnitude instead (routers never pruned) |")
    cal = record["calibration"]
    lines.append(f"| calibration | {cal['source']}: {cal['samples']} × {cal['seqlen']} tokens, seed {cal['seed']}"
                 f"{generated_note(cal)} |")
    ev = record.get("evaluation")
    if ev:
        lines += [
            f"| perplexity, dense | {ev['ppl_dense']:.3f} |",
            f"| perplexity, pruned | {ev['ppl_pruned']:.3f} |",
            f"| perplexity protocol | {text_name(ev)}, first {ev['windows']} "
            f"non-overlapping windows of {ev['seqlen']} tokens{' (BOS first)' if ev['bos'] else ''} |",
        ]
    t = record["timings"]
    lines.append(f"| pruning time | {t['prune_s']:.1f} s on {record['device']}, {record['threads']} threads |")
    v = record["versions"]
    lines.append(f"| software | llmprune {v['llmprune']}, torch {v['torch']}, "
                 f"transformers {v['transformers']}, Python {v['python']} |")
    lines += tasks_table(record)
    lines += reproduce(record)
    for note in record.get("notes", []):
        lines += [f"Note: {note}", ""]
    lines += ["## Per-layer results", "",
              "| linear | shape | sparsity | rel. output error |", "|---|---|---|---|"]
    for item in record["layers"]:
        shape = "×".join(str(s) for s in item["shape"])
        lines.append(f"| {item['name']} | {shape} | {item['sparsity']:.2%} | {item['error']:.4f} |")
    lines.append("")
    return "\n".join(lines)


def reproduce(record: dict[str, Any]) -> list[str]:
    """The command that made the checkpoint; for a Python API call, its recipe (YAML), which
    ``llmprune --recipe`` runs again."""
    if record.get("command"):
        return ["", "Reproduce:", "", "```", shlex.join(record["command"]), "```", ""]
    import yaml

    recipe = yaml.safe_dump(record["recipe"], sort_keys=False).rstrip()
    return ["", "Reproduce (made from Python; the same job as a recipe for `llmprune --recipe FILE`):", "",
            "```yaml", recipe, "```", ""]


def generated_note(cal: dict[str, Any]) -> str:
    """How many calibration windows the dense model wrote (empty when none)."""
    count = cal.get("generated") or 0
    if not count:
        return ""
    bounds = piece_bounds(int(cal["seqlen"]))
    sizes = sorted({b - a for a, b in itertools.pairwise(bounds)})
    size = "-".join(str(n) for n in sizes)
    pieces = f"{len(bounds) - 1} pieces of {size} tokens" if len(bounds) > 2 else "one piece"
    return (f"; the first {count} written by the dense model itself, sampled (temperature 1) in {pieces} "
            f"a window, each from the real window's first {PREFIX} tokens there")


def text_name(ev: dict[str, Any]) -> str:
    """The evaluation text as the protocol names it: a source's held-out split, or a warning
    that it is the calibration text itself."""
    if ev.get("same_text_as_calibration"):
        return f"{ev['source']} (the calibration text itself: not held out)"
    if ev["source"] in SPLIT_SOURCES:
        return f"{ev['source']} evaluation split"
    return str(ev["source"])


def tasks_table(record: dict[str, Any]) -> list[str]:
    """lm-eval results, dense and pruned side by side (value ± stderr)."""
    tasks = record.get("tasks")
    if not tasks:
        return []
    dense, pruned = tasks.get("dense", {}).get("results", {}), tasks.get("pruned", {}).get("results", {})
    limit = tasks.get("pruned", {}).get("limit")
    lines = ["", f"lm-eval {tasks.get('pruned', {}).get('lm_eval', '')} zero-/few-shot results"
             + (f" (limit {limit} examples per task)" if limit else "") + ":", "",
             "| task | metric | dense | pruned |", "|---|---|---|---|"]
    for task in sorted(set(dense) | set(pruned)):
        metrics = sorted(m for m in {**dense.get(task, {}), **pruned.get(task, {})} if not m.endswith("_stderr"))
        for metric in metrics:
            cells = []
            for side in (dense, pruned):
                row = side.get(task, {})
                value, err = row.get(metric), row.get(f"{metric}_stderr")
                cells.append("" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err else ""))
            lines.append(f"| {task} | {metric} | {cells[0]} | {cells[1]} |")
    return lines


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def structured_card(record: dict[str, Any]) -> str:
    """Model card of a structurally pruned (physically smaller) checkpoint."""
    st, params = record["structure"], record["parameters"]
    base = record["base_model"]
    lines = ["---", "library_name: transformers", "tags:", "- llmprune", "- pruned", "- structured-pruning"]
    if "/" in base and not base.startswith((".", "/")):
        lines.append(f"base_model: {base}")
    removed = params["decoder_layer_fraction_removed"]
    lines += ["---", "", f"# {base}: {record['pattern']} pruning ({record['method']}), "
              f"{removed:.1%} of decoder-layer parameters removed", "",
              f"Pruned with llmprune {record['llmprune_version']}. "
              "The model is physically smaller: stock `transformers` loads it with the rewritten config "
              "(no remote code).", "", "| | before | after |", "|---|---|---|",
              *([f"| experts per MoE layer | {st['experts_per_moe_layer'][0]} | {st['experts_per_moe_layer'][1]} "
                 "(router rows removed with them) |"] if record["pattern"] == "experts" else
                [f"| attention heads per layer | {st['attention_heads'][0]} | {st['attention_heads'][1]} "
                 f"({st['kv_heads_after']} KV) |",
                 f"| MLP width | {st['intermediate_size'][0]} | {st['intermediate_size'][1]} |"]),
              f"| decoder layers | {st['decoder_layers'][0]} | {st['decoder_layers'][1]} |",
              f"| parameters | {params['before']:,} | {params['after']:,} |",
              f"| decoder-layer parameters | {params['decoder_layers_before']:,} | "
              f"{params['decoder_layers_after']:,} |",
              f"| weights | {_mb(record['weights_bytes']['before'])} | {_mb(record['weights_bytes']['after'])} |"]
    if record.get("checkpoint_bytes"):
        lines.append(f"| safetensors on disk | | {_mb(record['checkpoint_bytes'])} |")
    then = record.get("then_sparsity")
    if then:
        lines.append(f"| then pruned unstructured ({then['method']}) | | target {then['sparsity_target']:.1%}, "
                     f"achieved {then['sparsity_achieved']:.2%} of the decoder-layer weights |")
    ev = record.get("evaluation")
    if ev:
        lines.append(f"| perplexity ({text_name(ev)}, {ev['windows']} × {ev['seqlen']}) | "
                     f"{ev['ppl_dense']:.3f} | {ev['ppl_pruned']:.3f} |")
    sp = record.get("decode_speed")
    if sp:
        lines.append(f"| decode speed (batch 1, greedy, {sp['new_tokens']} tokens, {sp['threads']} threads, "
                     f"{sp['device']}) | {sp['tokens_per_s_dense']:.1f} tok/s | {sp['tokens_per_s_pruned']:.1f} "
                     f"tok/s ({sp['speedup']:.2f}x) |")
    cal = record["calibration"]
    drop = record["config"].get("drop_layers")
    if drop:
        shares = [e["bridge_explained"] for e in record.get("layers", []) if "bridge_explained" in e]
        lines += ["", f"Depth: {drop} of {st['decoder_layers'][0]} decoder layers (least block influence) were "
                  "dropped first; heads and channels of the layers kept removed the rest of the target. "
                  + (f"Bridges: the down_proj before each dropped run was refitted to carry "
                     f"{', '.join(f'{x:.0%}' for x in shares)} of what the run added (calibration tokens)."
                     if shares else "No bridges (the dropped layers' contribution is simply gone).")]
    dropped = record.get("dropped_layers")
    if dropped:
        lines += ["", f"Dropped decoder layers (original indices): {', '.join(f'layer {i}' for i in dropped)}."]
    what = "Layers ranked by block influence" if record["pattern"] == "layers" else f"Score: {record['method']}"
    lines += ["", f"{what}; calibration: {cal['source']}, {cal['samples']} × {cal['seqlen']} "
              f"tokens, seed {cal['seed']}{generated_note(cal)}; FLAP bias compensation: {st['bias_compensation']}."]
    lines += saliency_section(record.get("saliency"))
    lines += tasks_table(record)
    lines += reproduce(record)
    for note in record.get("notes", []):
        lines += [f"Note: {note}", ""]
    return "\n".join(lines)


def read_saliency(path: str) -> dict[str, Any]:
    """The correlations of a ``saliency.json`` (``llmprune analyze saliency``), checked, for a
    model card: each study's Spearman ρ per criterion, their means and the best criterion."""
    where, record = read_analysis(path, "saliency")
    if not (isinstance(record, dict) and record.get("kind") == "saliency" and isinstance(record.get("studies"), list)
            and isinstance(record.get("mean_spearman"), dict)):
        raise LlmpruneError(f"{where} is not the saliency.json of `llmprune analyze saliency`")
    try:
        studies = [{"layer": int(s["layer"]), "unit": str(s["unit"]), "spearman": dict(s["spearman"])}
                   for s in record["studies"]]
    except (KeyError, TypeError, ValueError):
        raise LlmpruneError(f"{where} has malformed studies; give the saliency.json of `llmprune analyze "
                            "saliency`") from None
    return {"source": where.name, "model": record.get("model"), "best": record.get("best"),
            "mean_spearman": record["mean_spearman"], "studies": studies}


def _rho(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def saliency_section(saliency: dict[str, Any] | None) -> list[str]:
    """The oracle study's correlation table (Markdown lines), if the run was given one."""
    if not saliency:
        return []
    studies, means = saliency["studies"], saliency["mean_spearman"]

    def order(name: str) -> float:
        return 2.0 if _rho(means[name]) == "n/a" else -float(means[name])

    lines = ["", "## Saliency criteria against the oracle", "",
             "Spearman correlation of each criterion's ranking of units with the exact change in calibration loss "
             f"when the unit alone is removed (`llmprune analyze saliency` on {saliency.get('model')}); best: "
             f"**{saliency.get('best')}**.", "",
             "| criterion | " + " | ".join(f"layer {s['layer']} {s['unit']}" for s in studies) + " | mean |",
             "|" + "---|" * (len(studies) + 2)]
    for name in sorted(means, key=order):
        lines.append(f"| {name} | " + " | ".join(_rho(s["spearman"].get(name)) for s in studies) +
                     f" | {_rho(means[name])} |")
    return lines


def pieces_line(record: dict[str, Any]) -> str:
    """Which of the composable pieces ran, in words."""
    options, config = record["resolved_options"], record["config"]
    parts = [f"mask refinement: {options.get('refine') or 'none'}"]
    if options.get("model_target"):  # the key is new in 2026-12
        parts.append(f"refit target: {options['model_target']:g} of the way from the dense linear on the pruned "
                     "inputs to the dense model's outputs at each linear")
    if options.get("pass_dtype", "float32") != "float32":  # the key is new in 2026-12
        parts.append(f"calibration passes in {options['pass_dtype']} (sums and solves in float32)")
    allocation = record.get("allocation")
    if allocation:
        sparsity = allocation["sparsity"]
        spread = f"{min(sparsity):.3f} to {max(sparsity):.3f}"
        if allocation["kind"] == "global":
            parts.append(f"layer sparsity: one global comparison group of {allocation['method']} saliencies "
                         f"({spread})")
        elif allocation["kind"] == "sensitivity":
            parts.append(f"layer sparsity: from measured sensitivity curves ({allocation['source']}; {spread})")
        else:
            read = (f"input norms of the {allocation['generated_tokens']} tokens the dense model read while writing "
                    "calibration windows"
                    if allocation.get("generated_tokens") else f"a dense pass over {allocation['samples']} samples")
            parts.append(f"layer sparsity: OWL (M {allocation['m']:g}, lambda {allocation['lambda']:g}; {read}; "
                         f"{spread})")
    else:
        parts.append("layer sparsity: uniform")
    recovery = record.get("recovery") or []
    if recovery:
        kept = sum(1 for r in recovery if r["kept"])
        batch = (record.get("calibration") or {}).get("batch_size")
        steps = f" in batches of {batch} samples" if batch else ""
        # Records written before these options existed trained at a constant step, last epoch.
        decay = " down a cosine to 0" if config.get("recover_schedule") == "cosine" else ""
        best = ", each stage's best epoch by the held-out error" if config.get("recover_keep") == "best" else ""
        # Before recover_target existed the targets were the dense layer on the pruned inputs.
        target = (" toward the dense model's own activations" if config.get("recover_target") == "model"
                  else " toward the dense layer on the pruned inputs")
        shuffled = sum(1 for r in recovery if r.get("mlp_on_tokens"))  # the key is new in 2026-12
        tokens = (f", the MLP alone on tokens shuffled across the batches ({config.get('recover_mlp_steps')} steps "
                  f"per calibration batch) in {shuffled} of {len(recovery)} layer steps" if shuffled else "")
        parts.append(f"block-wise recovery: {config.get('recover_epochs')} epochs at lr {config.get('recover_lr'):g}"
                     f"{decay}{steps}{best}{target}{tokens}, kept in {kept} of {len(recovery)} layer steps")
    if config.get("schedule"):
        parts.append("schedule: " + ", ".join(f"{s:g}" for s in config["schedule"]))
    return "; ".join(parts)
