"""IR properties: facts about one layer graph that passes `require`, `produce` or `forbid` (passes/base.py).

The only place their names are spelled: passes use these constants, and `PassManager.validate()` rejects a pass
declaring a name that is not in `KNOWN` (a typo would otherwise make a requirement nobody can produce, or a
`forbids` that never holds). A property is a fact about the graph, never a pass name: a new pass that rounds
weights produces WEIGHTS_ROUNDED and every pass that must not follow rounding already forbids it.
"""

CAPTURED = "captured"                  # a decoder layer as capture made it (what every pipeline starts from)
ANNOTATED = "annotated"                # scheme passes decided: Linears carry meta.QUANT_SPEC / FLOAT_QUANT_TYPE
SMOOTHED = "smoothed"                  # activation outliers migrated into the weights (smooth)
WEIGHTS_ROUNDED = "weights_rounded"    # Linears' integer codes are chosen (meta.WEIGHT_QPARAMS: gptq, awq)
WEIGHTS_PRUNED = "weights_pruned"      # Linears' weights are pruned (meta.SPARSITY: sparse)
KV_QUANTIZED = "kv_quantized"          # the KV cache is quantized (kv8)
FA_QUANTIZED = "fa_quantized"          # attention's Q/K/V are quantized per head (fa3)
TP_SIMULATED = "tp_simulated"          # communication Linears compute per simulated card (simulate_tp)
FALLBACK_APPLIED = "fallback_applied"  # the model-wide fallback decision is applied (fallback)
OBSERVED = "observed"                  # observers sit on the statically quantized inputs (observe)
CALIBRATED = "calibrated"              # observers hold calibration ranges (calibrate)
LOWERED = "lowered"                    # annotated Linears are quantized kernels (lower)

KNOWN = frozenset({CAPTURED, ANNOTATED, SMOOTHED, WEIGHTS_ROUNDED, WEIGHTS_PRUNED, KV_QUANTIZED, FA_QUANTIZED,
                   TP_SIMULATED, FALLBACK_APPLIED, OBSERVED, CALIBRATED, LOWERED})
