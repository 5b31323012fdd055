"""The ONNX backend: the compiled executable graph lowered to one ONNX model run by onnxruntime.

- export.py: OUT/executable -> OUT/onnx/model.onnx (+ model.onnx.data, tokenizer, onnx_model.json)
- prepare.py: float32 decoder layers + the whole-model module that is exported
- translate.py: `qc::*` ops -> `qc.*` placeholder nodes (onnxscript translations)
- lower.py: placeholders -> QuantizeLinear / MatMulInteger / DequantizeLinear / MatMulNBits ...
- runner.py: onnxruntime CPU session for `qcompile eval` / `qcompile run`
- crosscheck.py: executable graph vs onnxruntime (max |logit diff|, perplexity of both)

onnx, onnxruntime and onnxscript are the `onnx` extra; nothing here is imported unless used.
"""
