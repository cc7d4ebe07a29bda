import pytest
import torch

from hooks import ModuleHook, RoutingRecorder, attach, attached_hook, detach, find_moe_blocks
from offload_moe import UnsupportedModelError, patch
from tests.helpers import FAMILIES, tiny_dense_model, tiny_model


class Doubler(ModuleHook):
    def post_forward(self, module, output):
        return output * 2


def test_attach_detach_is_symmetric():
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    before = lin(x)
    hook = Doubler()
    attach(lin, hook)
    assert torch.equal(lin(x), before * 2)
    assert attached_hook(lin) is hook
    with pytest.raises(RuntimeError, match="already has a hook"):
        attach(lin, Doubler())
    assert detach(lin) is hook
    assert "forward" not in lin.__dict__
    assert torch.equal(lin(x), before)
    assert detach(lin) is None


def test_detach_restores_an_instance_level_forward():
    lin = torch.nn.Linear(3, 3)
    lin.forward = lambda x: x + 1  # someone else's instance-level override
    attach(lin, Doubler())
    x = torch.zeros(1, 3)
    assert torch.equal(lin(x), torch.full((1, 3), 2.0))
    detach(lin)
    assert torch.equal(lin(x), torch.ones(1, 3))


def test_run_can_call_forward_several_times():
    class Twice(ModuleHook):
        def run(self, module, forward, x):
            return forward(x) + forward(x)

    lin = torch.nn.Linear(2, 2)
    x = torch.randn(1, 2)
    ref = lin(x)
    attach(lin, Twice())
    assert torch.allclose(lin(x), 2 * ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_find_moe_blocks(family):
    model = tiny_model(family)
    blocks = find_moe_blocks(model)
    assert [b.index for b in blocks] == list(range(model.config.num_hidden_layers))
    for b in blocks:
        assert b.num_experts == 8
        assert b.top_k == model.config.num_experts_per_tok
        assert b.norm is not None and b.norm.weight.shape == (model.config.hidden_size,)
        assert set(b.expert_param_names()) == {"gate_up_proj", "down_proj"}
        h, i = model.config.hidden_size, b.experts.down_proj.shape[-1]  # one expert: [2I, H] and [H, I]
        assert b.expert_shapes() == {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}
    if family == "qwen2_moe":  # the shared expert is not part of the offloaded experts
        assert all("shared_expert" not in n for b in blocks for n in b.expert_param_names())


def test_a_dense_model_has_no_blocks_and_offload_moe_says_so():
    dense = tiny_dense_model()
    assert find_moe_blocks(dense) == []
    with pytest.raises(
        UnsupportedModelError, match="LlamaForCausalLM has no MoE block offload-moe can drive: no experts module found"
    ):
        patch(dense, device="cpu")
    with pytest.raises(ValueError, match="no MoE block"):
        RoutingRecorder(dense)


def test_init_and_detach_hooks_run_once_each():
    events = []

    class Tracking(ModuleHook):
        def init_hook(self, module):
            events.append(("init", module))

        def detach_hook(self, module):
            events.append(("detach", module))

    lin = torch.nn.Linear(2, 2)
    hook = Tracking()
    attach(lin, hook)
    assert events == [("init", lin)]
    detach(lin)
    detach(lin)  # a second detach is a no-op
    assert events == [("init", lin), ("detach", lin)]


def test_routing_recorder_captures_every_layer():
    model = tiny_model("mixtral")
    x = torch.randint(0, 128, (2, 7))
    with RoutingRecorder(model) as trace, torch.no_grad():
        model(x)
    assert len(trace.index) == 3
    for layer in range(3):
        idx = trace.layer_index(layer)
        assert idx.shape == (14, 2) and int(idx.max()) < 8
        assert torch.allclose(torch.cat(trace.weights[layer]).sum(-1), torch.ones(14))
    with torch.no_grad():
        model(x)
    assert len(trace.index[0]) == 1  # hooks removed on exit
