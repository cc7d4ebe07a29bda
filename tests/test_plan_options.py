"""The offload plan without a model, the options object, and what patch leaves of process-wide state."""

import subprocess
import sys

import pytest
import torch

import offload_moe
from offload_moe import BudgetError, ExpertGeometry, OffloadOptions, make_plan
from offload_moe.standins.catalog import StandinCatalog, assign_mixed, quant_expert_bytes
from tests.helpers import tiny_model

# Mixtral-8x7B in bfloat16: 32 layers x 8 experts, 3 matrices of 4096 x 14336
MIXTRAL = ExpertGeometry(32, 8, 2, {"gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}, itemsize=2)


def test_plan_of_mixtral_by_hand():
    assert MIXTRAL.expert_bytes == 3 * 4096 * 14336 * 2  # 352 MB
    plan = make_plan(MIXTRAL, "24GiB", OffloadOptions())
    assert plan.slots == 24 * 2**30 // MIXTRAL.expert_bytes == 73
    assert plan.standin_bytes == 0 and plan.device_expert_bytes <= plan.budget_bytes
    assert make_plan(MIXTRAL, 1.0, OffloadOptions()).all_resident


def test_lowrank_standins_take_their_share_and_count_against_the_budget():
    plan = make_plan(MIXTRAL, 0.25, OffloadOptions(standin="lowrank", standin_fraction=0.05))
    per_rank = (28672 + 4096 + 4096 + 14336) * 2
    total = 256 * 3 * 4096 * 14336 * 2  # bytes of all 256 experts
    assert plan.standin_bytes == 256 * plan.sizing.rank * per_rank  # every expert's factors at that rank
    assert plan.standin_bytes <= 0.05 * total < plan.standin_bytes + 256 * per_rank  # the largest rank within 5%
    assert plan.device_expert_bytes <= plan.budget_bytes
    capped = make_plan(MIXTRAL, 0.1, OffloadOptions(standin="lowrank", standin_fraction=0.5))
    assert capped.standin_bytes <= 0.4 * capped.budget_bytes  # never more than 40% of the budget
    catalog = StandinCatalog(3, ("quant4", "lowrank3"), 64, torch.zeros(32, 8, 2), torch.ones(32, 8))
    assert make_plan(MIXTRAL, 0.25, OffloadOptions(standin="lowrank"), catalog).sizing.rank == 3


def test_quantized_standins_count_at_their_packed_size():
    plan = make_plan(MIXTRAL, 0.5, OffloadOptions(standin="quant", bits=3, group_size=128))
    codes = (28672 * 4096 + 4096 * 14336) * 3 // 8
    scales = 2 * 2 * (28672 * 4096 // 128 + 4096 * 14336 // 128)  # float16 scale and zero per group of 128
    assert quant_expert_bytes(MIXTRAL, 3, 128) == codes + scales
    assert plan.standin_bytes == 256 * (codes + scales) and plan.device_expert_bytes <= plan.budget_bytes
    with pytest.raises(BudgetError, match="raise the budget"):
        make_plan(MIXTRAL, 0.2, OffloadOptions(standin="quant", bits=8))  # 53% of the bytes as stand-ins


def test_mixed_assignment_spends_the_bytes_where_frequent_experts_gain_most():
    """Two experts, kinds 2-bit (error 0.5) and 8-bit (error 0.1 / 0.4): the frequent one gets the upgrade."""
    g = ExpertGeometry(1, 2, 1, {"gate_up_proj": (64, 64), "down_proj": (64, 32)}, itemsize=2)
    errors = torch.tensor([[[0.5, 0.1], [0.5, 0.4]]])  # [L, E, K]
    catalog = StandinCatalog(4, ("quant2", "quant8"), 32, errors, torch.tensor([[1.0, 9.0]]))
    cheap, rich = catalog.kind_bytes(g)
    kinds, used = assign_mixed(catalog, [cheap, rich], cheap + rich, budget_b=10**9)
    assert kinds == (("quant2", "quant8"),) and used == cheap + rich  # 9 x 0.1 saved beats 1 x 0.4
    kinds, used = assign_mixed(catalog, [cheap, rich], 2 * rich, budget_b=10**9)
    assert kinds == (("quant8", "quant8"),)
    with pytest.raises(BudgetError, match="cheapest for every expert"):
        assign_mixed(catalog, [cheap, rich], cheap, budget_b=10**9)


def test_budget_errors_say_how_much_is_needed():
    with pytest.raises(BudgetError, match="raise the budget to at least 672.0 MiB"):
        make_plan(MIXTRAL, "500MiB", OffloadOptions())
    with pytest.raises(BudgetError, match="no room for rank-1 stand-ins"):
        make_plan(MIXTRAL, "10MiB", OffloadOptions(standin="lowrank"))
    ungated = ExpertGeometry(2, 4, 1, {"up_proj": (8, 4), "down_proj": (4, 8)}, itemsize=4)
    with pytest.raises(ValueError, match="needs gated experts"):
        make_plan(ungated, 0.5, OffloadOptions(standin="lowrank"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"miss_path": "pray"}, ValueError, "unknown miss_path 'pray'"),
        ({"prefetch": "oracle"}, ValueError, "unknown prefetch 'oracle'"),
        ({"eviction": "fifo"}, ValueError, "unknown eviction policy 'fifo'"),
        ({"critical_weight": 0}, ValueError, "critical_weight"),
        ({"lookahead_depth": 0}, ValueError, "lookahead needs depth"),
        ({"standin": "buddy"}, ValueError, "needs buddy lists"),
        ({"miss_path": "drop"}, ValueError, "pass standin='drop'"),
        ({"standin": "magic"}, ValueError, "unknown standin 'magic'"),
        ({"compile": "fast"}, ValueError, "a torch.compile mode"),
        ({"link": 3}, TypeError, r"unknown option\(s\) \['link'\]"),
        ({"budgte": 0.5}, TypeError, r"unknown option\(s\) \['budgte'\]"),
    ],
)
def test_options_are_validated_once(kwargs, error, match):
    with pytest.raises(error, match=match):
        OffloadOptions.of(**kwargs)


def test_options_object_and_keywords_combine(patched):
    base = OffloadOptions(standin="drop", prefetch=None)
    assert OffloadOptions.of(base, critical_weight=0.7) == OffloadOptions(standin="drop", critical_weight=0.7,
                                                                          prefetch=None)  # fmt: skip
    model = tiny_model("mixtral")
    handle = patched(model, budget=0.5, device="cpu", options=base, eviction="lfu")
    assert (handle.options.standin, handle.options.eviction, handle.options.prefetch) == ("drop", "lfu", None)
    handle.unpatch()


def test_load_refuses_to_pin_a_memory_map(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="memory-mapped"):
        offload_moe.load(tmp_path, budget=0.5, device="cpu", pin_memory=True)


OPTIONAL = ("matplotlib", "fastapi", "uvicorn", "prometheus_client", "onnx", "onnxruntime", "openai", "ray")  # extras


def _run(code: str, blocked: tuple[str, ...] = OPTIONAL) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where the `blocked` dependencies cannot be imported (as if not installed)."""
    block = f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True)


def test_the_core_packages_import_without_any_extra():
    done = _run("import offload_moe, fairness, hooks, fairness.mope\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize(("module", "extra"), [("fairness.serve", "serve"), ("fairness.serving.server", "serve"),
                                               ("fairness.mope.onnx_export", "mope"), ("fairness.gateway", "gateway"),
                                               ("fairness.gateway.ray_app", "ray")])  # fmt: skip
def test_a_missing_extra_is_named(module, extra):
    failed = _run(f"import {module}", ("ray",) if extra == "ray" else OPTIONAL)  # ray's extra includes serve
    assert failed.returncode != 0 and f"pip install 'offload-moe[{extra}]'" in failed.stderr, failed.stderr


def test_importing_the_packages_draws_nothing():
    code = (
        "import sys, offload_moe, fairness, hooks; print(sorted(m for m in " + repr(OPTIONAL) + " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # installed here, but the core never imports them


@pytest.mark.bench
def test_every_option_has_a_documented_default_and_reason_and_docs_options_md_is_current():
    """One source per option: each OffloadOptions field carries its group, meaning and the reason for its default;
    docs/options.md is generated from them (python -m lab.options_doc) and fails here when it drifts."""
    from dataclasses import fields
    from pathlib import Path

    from lab.options_doc import render
    from offload_moe.options import GROUPS, OffloadOptions

    for f in fields(OffloadOptions):
        assert f.metadata.get("group") in GROUPS, f.name
        assert len(f.metadata.get("doc", "")) > 20 and len(f.metadata.get("why", "")) > 10, f.name
    for arg in ("dtype", "read", "ram_budget"):
        assert f"{arg}:" in offload_moe.load.__doc__ and "Default" in offload_moe.load.__doc__
    doc = Path(__file__).resolve().parents[1] / "docs" / "options.md"
    assert doc.read_text() == render(), "docs/options.md is stale: run python -m lab.options_doc"
    assert all(f"`{f.name}`" in OffloadOptions.__doc__ for f in fields(OffloadOptions))


def test_fallback_still_works_as_miss_path_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="fallback= is renamed miss_path="):
        opt = OffloadOptions.of(fallback="host")
    assert opt.miss_path == "host"
    with pytest.raises(TypeError, match="pass miss_path= only"), pytest.warns(DeprecationWarning):
        OffloadOptions.of(fallback="host", miss_path="fetch")


def test_offload_stats_reports_every_counter_by_its_own_name():
    """One source per fact: a snapshot copies each counter under the counter's own field name; a counter added to
    Counters without a place in OffloadStats (or a declared internal) fails here."""
    from dataclasses import fields

    from offload_moe.handle import COUNTED, INTERNAL_COUNTERS, OffloadStats
    from offload_moe.runtime.counters import Counters

    counters = {f.name for f in fields(Counters)}
    assert counters == set(COUNTED) | INTERNAL_COUNTERS
    assert set(COUNTED) <= {f.name for f in fields(OffloadStats)}
