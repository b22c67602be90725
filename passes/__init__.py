"""graphopt's passes, one module per pass (installed as `graphopt.passes`).

Importing this package imports every module in it, which registers each pass class once.
`PRESETS` names the pass lists the command line offers.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

LOSSLESS = [
    "lift-constants",
    "eliminate-identities",
    "fold-constants",
    "simplify-reshapes",
    "softmax-last-axis",  # after simplify-reshapes: constant Reshape targets let onnx infer the ranks it needs
    "fold-batchnorm",
    "fold-scalar-affine",
    "fuse-hard-sigmoid",
    "scalar-affine-to-conv",  # after fuse-hard-sigmoid: onnxruntime fuses the hard swish before the chain into its Conv
    "split-conv",  # after the folds: the Conv's weights are final when they are cut
    "fold-shared-weights",
    "merge-duplicate-nodes",
    "remove-dead-code",
]

# onnxruntime's own fused kernels for patterns exporters spell out (contrib ops: the result needs
# onnxruntime), so in the presets that already target it and not in `lossless`, which stays standard ONNX.
# In `int8` they run after quantizing, so that their latency is judged on the model they will run in:
# MiniLM's attention fused measured 0.96-0.97 of the float model (at the latency guard's 0.97 bar, kept in
# some runs and not others) and 0.89 of the int8 one, where the matrix products it leaves out are 2.5x
# faster. In `int4` they run before: onnx infers no shapes through MatMulNBits (a contrib op), and
# fuse-attention needs the head count.
RUNTIME_FUSIONS = ["fuse-attention"]

PRESETS: dict[str, list[str]] = {
    "lossless": LOSSLESS,
    # clean-up, outlier channels smoothed into their producers, static or dynamic int8 (whichever measures
    # faster within the budget), then the fusions (QAttention where the attention's projections were quantized
    # dynamically); the weights still float after that are stored as int8 per
    # channel in the folded form (onnxruntime restores them when it loads the model): a file about 4x smaller
    # even where the integer kernels are not faster on the target CPU
    "int8": LOSSLESS + ["smooth-quant", "quantize-int8"] + RUNTIME_FUSIONS + ["fuse-quantized-attention", "quantize-weights:bits=8:block_size=0:format=folded"],
    # clean-up and fusions, then weight-only int4 (int8 where int4 breaks the budget), for size; asymmetric
    # GPTQ measured best on MiniLM (pooled cosine 0.982 against 0.960 for symmetric round-to-nearest)
    "int4": LOSSLESS + RUNTIME_FUSIONS + ["quantize-weights:bits=4:method=gptq:symmetric=false"],
}
