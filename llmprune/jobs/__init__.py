"""Jobs: frozen specs, the pipeline of stages over a model store, the record and model card,
recipes and sweeps."""
