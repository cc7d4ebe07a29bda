"""Every MoE family of the installed transformers (enumerated from transformers itself, not a hand-kept list): a tiny
random model of each, patched with the default options at two budgets, equals the unpatched model; a family
offload-moe cannot drive is refused with the reason; one that cannot be built tiny on CPU is skipped, saying why."""

import pytest

from lab.families import check_family, moe_families

pytestmark = [pytest.mark.slow, pytest.mark.bench]  # tests of the lab's tools

FAMILIES = moe_families()  # from the installed transformers, pinned by pyproject (5.24)
MUST_BE_LOSSLESS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "granitemoeshared",
                    "granitemoe_swa", "phimoe", "nemotron_h", "deepseek_v3", "qwen3_next", "cohere2_moe",
                    "minimax_m2", "hy_v3", "deepseek_v4"}  # fmt: skip


def test_the_enumeration_finds_the_families_people_run():
    assert len(FAMILIES) >= 40
    assert MUST_BE_LOSSLESS <= set(FAMILIES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_is_lossless_or_refused_with_a_reason(model_type):
    check = check_family(model_type, budgets=(0.25, 0.5))
    if check.status == "unbuildable":
        pytest.skip(f"{model_type}: no tiny model on this CPU ({check.detail})")
    if check.status == "unsupported":
        assert model_type not in MUST_BE_LOSSLESS, check.detail
        assert "(" in check.detail and "no experts module found" not in check.detail  # names the module and why
        return
    assert check.status == "lossless", f"{model_type}: patched logits differ by {check.detail}"
