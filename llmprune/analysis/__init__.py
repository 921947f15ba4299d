"""Analyses of a model's pruning behaviour: per-layer sensitivity (:mod:`.sensitivity`) and
saliency criteria ranked against an exhaustive oracle (:mod:`.oracle`)."""
