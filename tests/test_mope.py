"""MoPE: disjoint train/test parts, deterministic training and serving, ONNX parity with the training framework,
a measured accuracy bound, and clear errors for bad models."""

import numpy as np
import pytest
import torch

from fairness import EngineModel, make_workload, mope
from fairness.core.features import FEATURES, TARGETS
from fairness.core.predictor import HistoryPredictor, OnnxPredictor

ENGINE = EngineModel.preset("a10g-llama2-7b")


@pytest.fixture(scope="module")
def data():
    """Simulator logs of two workloads where the client decides the output length (64 or 512 / 256 tokens)."""
    workloads = ("poisson-short-long", "overload")
    return mope.Dataset.concat([mope.collect(make_workload(w, 90), ENGINE, source=w, until_s=90) for w in workloads])


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    train, test = data.split(0.7)
    model = mope.train(train, experts=3, steps=80)
    path = model.export(tmp_path_factory.mktemp("mope") / "mope.onnx")
    return train, test, model, path


def test_collected_rows_and_a_disjoint_time_split(data):
    assert data.x.shape == (len(data), len(FEATURES)) and data.y.shape == (len(data), len(TARGETS))
    assert (data.y[:, TARGETS.index("output_tokens")] >= 1).all() and (data.y[:, 1:] >= 0).all()
    train, test = data.split(0.7)
    assert len(train) + len(test) == len(data)
    for src in np.unique(data.source):
        assert train.arrival_s[train.source == src].max() < test.arrival_s[test.source == src].min()


def test_onnx_predictions_equal_the_frameworks(trained):
    _, test, model, path = trained
    served = OnnxPredictor(path).predict(test.x)
    reference = model.predict(test.x)  # the torch module, the one definition of the mixture
    assert served.shape == (len(test), len(TARGETS)) and (served >= 0).all()
    assert np.abs(served - reference).max() <= 1e-5


def test_training_and_serving_are_deterministic(data, trained, tmp_path):
    train, test, model, path = trained
    again = mope.train(train, experts=3, steps=80)
    weights, again_weights = model.state_dict(), again.state_dict()
    assert all(torch.equal(weights[k], again_weights[k]) for k in weights)
    assert again.export(tmp_path / "again.onnx").read_bytes() == path.read_bytes()
    first, second = OnnxPredictor(path), OnnxPredictor(tmp_path / "again.onnx")
    a = first.predict(test.x)
    assert np.array_equal(a, first.predict(test.x)) and np.array_equal(a, second.predict(test.x))
    one_by_one = np.concatenate([first.predict(row[None]) for row in test.x[:20]])
    assert np.allclose(one_by_one, a[:20], rtol=0, atol=1e-9)  # batch size does not change a prediction
    other_seed = mope.train(train, experts=3, steps=80, seed=1)
    assert not torch.equal(other_seed.w1, model.w1)


def test_mope_learns_what_a_constant_cannot(trained):
    train, test, _, path = trained
    got = mope.l1_errors(OnnxPredictor(path), test)["output_tokens"]
    constant = np.abs(test.y[:, 0] - np.median(train.y[:, 0])).mean()
    assert got < 0.5 * constant  # measured: 2.5 vs 57.6 tokens on these client-determined lengths
    assert OnnxPredictor(path).experts == 3


def test_history_predictor_falls_back_to_client_then_global_means():
    x = np.zeros((3, len(FEATURES)))
    x[0, FEATURES.index("log_client_mean_output")] = np.log1p(40)
    x[1, FEATURES.index("log_global_mean_output")] = np.log1p(90)
    y = HistoryPredictor(default_tokens=256).predict(x)
    assert y[:, 0] == pytest.approx([40, 90, 256]) and np.isnan(y[:, 1:]).all()


def test_bad_models_and_data_get_clear_errors(trained, tmp_path):
    train, _, model, _ = trained
    with pytest.raises(FileNotFoundError, match="train one"):
        OnnxPredictor(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        OnnxPredictor(tmp_path / "junk.onnx")
    from fairness.mope.onnx_export import to_onnx

    params = {k: v.numpy() for k, v in model.state_dict().items()}
    old = to_onnx(params, {"features": '["x"]', "targets": '["y"]'})
    (tmp_path / "old.onnx").write_bytes(old.SerializeToString())
    with pytest.raises(ValueError, match="retrain it"):
        OnnxPredictor(tmp_path / "old.onnx")
    with pytest.raises(ValueError, match="too few"):
        mope.train(train.take(np.arange(len(train)) < 5))
    with pytest.raises(ValueError, match="at least one"):
        mope.Dataset.concat([])
    with pytest.raises(ValueError, match="train_fraction"):
        train.split(1.5)
