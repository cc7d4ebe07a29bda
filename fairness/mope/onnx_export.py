"""The MoPE as an ONNX graph (float64), built node by node with `onnx.helper` from the trained weights: raw features
in, predictions out, standardisation, experts, gate and mixing included, so the scheduler feeds features only."""

from __future__ import annotations

import numpy as np

from fairness.extras import missing

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as e:
    raise missing("mope", e) from e

OPSET = 17


def to_onnx(params: dict[str, np.ndarray], metadata: dict[str, str]) -> onnx.ModelProto:
    f, t = params["w1"].shape[1], params["w3"].shape[2]
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float64), name=k) for k, v in params.items()]
    inits += [
        numpy_helper.from_array(np.array([2], dtype=np.int64), name="axis2"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), name="axis0"),
        numpy_helper.from_array(np.array(1.0), name="one"),
        numpy_helper.from_array(np.array(0.0), name="zero"),
    ]
    n = helper.make_node
    nodes = [
        n("Sub", ["features", "mean"], ["centred"]),
        n("Div", ["centred", "std"], ["scaled"]),
        n("Max", ["scaled", "zmin"], ["floored"]),
        n("Min", ["floored", "zmax"], ["z"]),  # [N, F], training range
        # experts: [N, F] @ [E, F, H] broadcasts to [E, N, H]
        n("MatMul", ["z", "w1"], ["e1"]),
        n("Add", ["e1", "b1"], ["e1b"]),
        n("Relu", ["e1b"], ["h1"]),
        n("MatMul", ["h1", "w2"], ["e2"]),
        n("Add", ["e2", "b2"], ["e2b"]),
        n("Relu", ["e2b"], ["h2"]),
        n("MatMul", ["h2", "w3"], ["e3"]),
        n("Add", ["e3", "b3"], ["experts_out"]),  # [E, N, T]
        # gate: softmax weights [N, E]
        n("MatMul", ["z", "g1"], ["q1"]),
        n("Add", ["q1", "gb1"], ["q1b"]),
        n("Relu", ["q1b"], ["gh"]),
        n("MatMul", ["gh", "g2"], ["q2"]),
        n("Add", ["q2", "gb2"], ["logits"]),
        n("Softmax", ["logits"], ["gate"], axis=1),
        n("Transpose", ["gate"], ["gate_t"], perm=[1, 0]),  # [E, N]
        n("Unsqueeze", ["gate_t", "axis2"], ["gate_w"]),  # [E, N, 1]
        n("Mul", ["experts_out", "gate_w"], ["weighted"]),
        n("ReduceSum", ["weighted", "axis0"], ["raw"], keepdims=0),  # [N, T], log1p space
        n("Exp", ["raw"], ["exp"]),
        n("Sub", ["exp", "one"], ["expm1"]),
        n("Max", ["expm1", "zero"], ["predictions"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mope",
        [helper.make_tensor_value_info("features", TensorProto.DOUBLE, ["N", f])],
        [helper.make_tensor_value_info("predictions", TensorProto.DOUBLE, ["N", t])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fairness.mope")
    model.ir_version = 8
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model
