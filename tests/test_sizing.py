"""budget="auto" and ram_budget="auto": the KV-cache estimate against a real cache, the room left on a device whose
free memory is set, the refusal that names its numbers, and cgroup limits read as the kernel applies them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache

import offload_moe
import offload_moe.sizing as sizing
from offload_moe import BudgetError
from offload_moe.blocks import expert_geometry, moe_blocks
from offload_moe.budget import available_host_bytes, cgroup_left_bytes
from offload_moe.sizing import kv_cache_bytes
from tests.helpers import REFERENCE_MODEL_DIR, tiny_model
from tests.memory_limit import MemoryLimit

MIB = 1 << 20


def _tiny_deepseek() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
                           num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=4,
                           num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256)  # fmt: skip
    return DeepseekV3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [lambda: tiny_model("mixtral"), lambda: tiny_model("qwen3_moe"), _tiny_deepseek])
def test_kv_cache_estimate_equals_the_cache_a_forward_fills(build):
    model = build()
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 40)), past_key_values=cache, use_cache=True)
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(model.config, torch.float32, tokens=40, batch=2) == real


def _expert_bytes(model) -> tuple[int, int]:
    g = expert_geometry(moe_blocks(model))
    return g.expert_bytes, g.total_bytes


def test_auto_budget_is_free_memory_less_kv_cache_and_margin(patched, monkeypatch):
    model = tiny_model("mixtral")
    one, every = _expert_bytes(model)
    kv = kv_cache_bytes(model.config, torch.float32, 64, 1)
    free = 4 * MIB + kv + 5 * one + one // 2  # room for five experts and a half after the margin
    monkeypatch.setattr(sizing, "free_device_bytes", lambda device: free)
    handle = patched(model, device="cpu", max_tokens=64, memory_margin="4MiB")  # budget="auto" is the default
    s = handle.stats()
    assert s.budget_bytes == 5 * one + one // 2 and s.slots == 5
    handle.unpatch()
    monkeypatch.setattr(sizing, "free_device_bytes", lambda device: 1 << 40)  # everything fits: every expert
    handle = patched(model, budget="auto", device="cpu")
    assert handle.stats().budget_bytes == every and handle.stats().slots == every // one
    handle.unpatch()


def test_auto_budget_below_one_tokens_experts_is_refused_with_its_numbers(patched, monkeypatch):
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(sizing, "free_device_bytes", lambda device: 2 * MIB)
    with pytest.raises(BudgetError) as e:
        patched(model, budget="auto", device="cpu", memory_margin="2MiB")
    msg = str(e.value)
    assert "2.0 MiB free on cpu" in msg and "2.0 MiB margin" in msg and "one token needs 2 experts" in msg
    assert "lower max_tokens / max_batch / memory_margin" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    monkeypatch.setattr(sizing, "free_device_bytes", lambda device: None)
    with pytest.raises(BudgetError, match="cannot read; pass a size"):
        patched(model, budget="auto", device="cpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_tokens": 0}, "max_tokens and max_batch must be >= 1"), ({"memory_margin": "lots"}, "is not a size")],
)
def test_bad_sizing_options_are_refused(kwargs, match, patched):
    with pytest.raises(ValueError, match=match):
        patched(tiny_model("mixtral"), device="cpu", **kwargs)


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_limit_is_read_from_the_process_own_group(tmp_path, version):
    proc = tmp_path / "cgroup"
    if version == 2:
        proc.write_text("0::/app/worker\n")
        d = tmp_path / "app" / "worker"
        d.mkdir(parents=True)
        (d / "memory.max").write_text(f"{900 * MIB}\n")
        (d / "memory.current").write_text(f"{400 * MIB}\n")
        (d / "memory.stat").write_text(f"anon {300 * MIB}\ninactive_file {50 * MIB}\n")
    else:
        proc.write_text("12:cpu,cpuacct:/app\n7:memory:/app/worker\n")
        d = tmp_path / "memory" / "app" / "worker"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(f"{900 * MIB}\n")
        (d / "memory.usage_in_bytes").write_text(f"{400 * MIB}\n")
        (d / "memory.stat").write_text(f"cache {80 * MIB}\ntotal_inactive_file {50 * MIB}\n")
    assert cgroup_left_bytes(proc, tmp_path) == 550 * MIB  # limit - usage + inactive page cache
    (d / ("memory.max" if version == 2 else "memory.limit_in_bytes")).write_text(
        "max\n" if version == 2 else "9223372036854771712\n"
    )
    assert cgroup_left_bytes(proc, tmp_path) is None  # no limit


def test_available_ram_respects_a_real_memory_cgroup():
    """A process put in a real memory cgroup of 600 MiB sees at most that much available."""
    group = MemoryLimit.make(600 * MIB)
    if group is None:
        pytest.skip("this machine does not let the tests make a memory cgroup")
    try:
        code = "from offload_moe.budget import available_host_bytes as a; print(a())"
        out = subprocess.run([sys.executable, "-c", code], preexec_fn=group.enter, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert 0 < int(out.stdout) <= 600 * MIB < available_host_bytes()
    finally:
        group.close()


def test_ram_budget_auto_makes_no_tier_on_a_cpu_device_and_fit_agrees(loaded):
    """On a CPU device the device budget is RAM already: "auto" builds no RAM tier there, and `fit` plans none."""
    _, handle = loaded(REFERENCE_MODEL_DIR, budget=0.25, device="cpu", ram_budget="auto")
    assert handle.stats().ram_bytes == 0
    assert offload_moe.fit(REFERENCE_MODEL_DIR, 0.25, "cpu", ram_budget="auto").ram_experts == 0
