"""The layer-wise engine: the model adapter (decoder layers, linears, routers), calibration
capture, the lockstep forward pass, the per-layer visit and the loop over layers, layer hosts
(in memory or streamed from shards) and device placement."""
