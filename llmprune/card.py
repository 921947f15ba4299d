"""The model card (README.md) of a pruned checkpoint: the facts of llmprune.json in tables."""

from __future__ import annotations

import shlex
from typing import Any


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def model_card(record: dict[str, Any]) -> str:
    method, pattern = record["method"], record["pattern"]
    tags = ["llmprune", "pruned", method, "sparse"] + (["n:m-sparsity"] if ":" in pattern else [])
    base = record["base_model"]
    lines = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if "/" in base and not base.startswith((".", "/")):
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {base}: {method} {pattern}, {record['sparsity_achieved']:.1%} sparse", ""]
    lines += [
        f"Pruned with [llmprune](https://github.com/llmprune/llmprune) {record['llmprune_version']}. "
        "The weights are dense safetensors with exact zeros; stock `transformers` loads them.", "",
        "| | |", "|---|---|",
        f"| base model | {record['base_model_description']} |",
        f"| architecture | {record['architecture']} |",
        f"| method | {method} (update: {record['resolved_options']['update']}, "
        f"sequential: {record['config']['sequential']}) |",
        f"| pattern | {pattern}" + (" (N kept in every M)" if ":" in pattern else "") + " |",
        f"| sparsity of pruned linears | target {record['sparsity_target']:.1%}, "
        f"achieved {record['sparsity_achieved']:.2%} |",
    ]
    cal = record["calibration"]
    lines.append(f"| calibration | {cal['source']}: {cal['nsamples']} × {cal['seqlen']} tokens, seed {cal['seed']} |")
    ev = record.get("evaluation")
    if ev:
        lines += [
            f"| perplexity, dense | {ev['ppl_dense']:.3f} |",
            f"| perplexity, pruned | {ev['ppl_pruned']:.3f} |",
            f"| perplexity protocol | {ev['source']} evaluation split, first {ev['windows']} "
            f"non-overlapping windows of {ev['seqlen']} tokens{' (BOS first)' if ev['bos'] else ''} |",
        ]
    t = record["timings"]
    lines.append(f"| pruning time | {t['prune_s']:.1f} s on {record['device']}, {record['threads']} threads |")
    v = record["versions"]
    lines.append(f"| software | llmprune {v['llmprune']}, torch {v['torch']}, "
                 f"transformers {v['transformers']}, Python {v['python']} |")
    lines += ["", "Reproduce:", "", "```", shlex.join(record["command"] or record["argv"]), "```", ""]
    for note in record.get("notes", []):
        lines += [f"Note: {note}", ""]
    lines += ["## Per-layer results", "",
              "| linear | shape | sparsity | rel. output error |", "|---|---|---|---|"]
    for item in record["layers"]:
        shape = "×".join(str(s) for s in item["shape"])
        lines.append(f"| {item['name']} | {shape} | {item['sparsity']:.2%} | {item['error']:.4f} |")
    lines.append("")
    return "\n".join(lines)
