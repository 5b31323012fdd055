"""Calibration statistics: what a quantization spec's observers compute, kept out of the IR.

- observers.py: MinMaxObserver, the activation range a static scheme's `observe` pass inserts;
- histogram.py: HistogramObserver / L2HistogramObserver (percentile, entropy, L2 clipping of that range);
- linear_inputs.py: LayerRunner, the one collector of Linear-input statistics inside a layer graph (Gram
  matrices, mean |x|, per-channel ranges, sampled rows) for smooth, awq, gptq and sparse;
- forward.py: the calibration forward, one per layer, that every observer of the final float graph sees (the
  activation observers and kv8's / fa3's absmax observers, whose rewrites it applies at their cut);
- weight_clip.py: weight scales other than absmax (`weight_observer=mse` clipping search, w8a8s outlier split).

Everything here reads the IR (ir/) and never a backend.
"""
