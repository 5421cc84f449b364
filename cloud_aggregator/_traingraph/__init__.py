"""The training-graph compiler: inference ONNX model -> portable training graphs.

Private to ``cloud_aggregator`` (its front door re-exports what users need). Modules:

- ``_builder``: ``GraphBuilder`` (emits nodes, constants, opset-dependent forms).
- ``_autodiff``: ``differentiate``, the rule table ``RULES``, ``FwdOp``, ``supported_ops``.
- ``_prepare``: ``prepare_model`` (checks, opset conversion), ``select_parameters``,
  ``infer_shapes``.
- ``_rules_math``: arithmetic, MatMul/Gemm, reductions (and ``unbroadcast``).
- ``_rules_act``: activations, Softmax, LogSoftmax.
- ``_rules_shape``: Reshape/Flatten/Squeeze/Unsqueeze, Transpose, Concat/Split, Slice,
  Gather, Pad.
- ``_rules_nn``: Conv, pools, BatchNormalization/LayerNormalization, Dropout.
- ``_train_forward``: the training-mode forward rewrites ``TRAIN_FORWARD``.
- ``_gradcheck``: ``gradient_model`` (a gradient graph of any small model, for tests).
- ``_losses``: ``LossSpec`` and the loss-term table ``LOSS_TERMS``.
- ``_optim``: ``SGD``, ``AdamW``, ``parse_optimizer`` and the table ``OPTIMIZERS``.
- ``_compile``: ``compile_training`` -> ``CompiledModel`` (the Loop training graph and
  the eval graph, with their input/output contract).
"""

from cloud_aggregator._traingraph._autodiff import RULES, supported_ops
from cloud_aggregator._traingraph._compile import CompiledModel, StateTensor, compile_training
from cloud_aggregator._traingraph._losses import (
    LOSS_TERMS,
    BinaryCrossEntropy,
    CrossEntropy,
    Distillation,
    LossSpec,
    MeanSquaredError,
)
from cloud_aggregator._traingraph._optim import (
    OPTIMIZERS,
    SGD,
    AdamW,
    OptimizerSpec,
    optimizer_from_json,
    optimizer_to_json,
    parse_optimizer,
)

__all__ = [
    "LOSS_TERMS",
    "OPTIMIZERS",
    "RULES",
    "SGD",
    "AdamW",
    "BinaryCrossEntropy",
    "CompiledModel",
    "CrossEntropy",
    "Distillation",
    "LossSpec",
    "MeanSquaredError",
    "OptimizerSpec",
    "StateTensor",
    "compile_training",
    "optimizer_from_json",
    "optimizer_to_json",
    "parse_optimizer",
    "supported_ops",
]
