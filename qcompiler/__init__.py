"""qcompiler: a post-training quantization compiler for LLMs on Huawei Ascend NPUs.

HF checkpoint -> per-decoder-layer FX graphs (torch.export) -> ordered passes -> Ascend artifact
+ executable graph of fused quantized kernels + report.
"""
__version__ = "0.1.0"
