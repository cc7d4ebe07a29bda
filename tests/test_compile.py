"""`patch(..., compile=True)`: the model's forward compiled as one graph over the patched model. Compiled patched
decoding equals compiled resident decoding, a 100-step decode never recompiles after warm-up, no graph breaks,
counters and the prefetcher still work, continuous batching runs eager, and `unpatch()` leaves no trace."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import GenerationConfig, StaticCache
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from hooks import attached_hook, find_moe_blocks, is_attached
from tests.helpers import requires_cuda, tiny_model

pytestmark = pytest.mark.slow  # every test compiles a model (seconds each)

IDS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
CACHE_LEN = 110  # every static cache here has this length: tests whose graphs match share inductor's cached code


@torch.no_grad()
def static_decode(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `ids` [1, P], then `steps` greedy tokens one at a time through a static KV cache:
    (logits [steps + 1, V] of every step, tokens [steps]). Logits are cloned: CUDA graphs reuse their outputs."""
    assert ids.shape[1] + steps < CACHE_LEN
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    out = [model(input_ids=ids, cache=cache, use_cache=True, position_ids=pos).logits[0, -1].clone()]
    tokens = []
    for t in range(steps):
        tokens.append(out[-1].argmax())
        step = {
            "cache": cache,
            "use_cache": True,
            "position_ids": torch.full((1, 1), ids.shape[1] + t, device=ids.device),
        }
        out.append(model(input_ids=tokens[-1].view(1, 1), **step).logits[0, -1].clone())
    return torch.stack(out), torch.stack(tokens)


def compiles() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def reference():
    """Compiled resident decoding of the tiny Mixtral: the reference for every compiled patched run."""
    model = tiny_model("mixtral")
    eager = static_decode(model, IDS, 12)
    forward = model.forward
    model.forward = torch.compile(forward)
    compiled = static_decode(model, IDS, 12)
    return eager, compiled


CONFIGS = [
    pytest.param(1.0, {}, id="budget-1.0"),
    pytest.param(0.5, {"miss_path": "fetch", "prefetch": None}, id="fetch"),
    pytest.param(0.5, {"miss_path": "host"}, id="host"),
    pytest.param(0.5, {"miss_path": "auto", "prefetch": "lookahead"}, id="auto+lookahead"),
    pytest.param(0.5, {"placement": "static-layers"}, id="static-layers"),
]


@pytest.mark.parametrize(("budget", "options"), CONFIGS)
def test_compiled_patched_decoding_equals_compiled_resident(patched, reference, budget, options):
    (_, eager_tokens), (ref_logits, ref_tokens) = reference
    assert torch.equal(ref_tokens, eager_tokens)  # compiling the resident model changes no token
    model = tiny_model("mixtral")
    handle = patched(model, budget=budget, device="cpu", compile=True, **options)
    graphs, breaks = compiles()
    got_logits, got_tokens = static_decode(model, IDS, 12)
    assert compiles()[1] == breaks  # the residency decisions are one op in the graph, never a break
    assert compiles()[0] > graphs  # it really ran compiled
    assert torch.equal(got_tokens, ref_tokens)
    torch.testing.assert_close(got_logits, ref_logits, rtol=0, atol=1e-5)  # the eager lossless tests' tolerance
    s = handle.stats()
    assert s.hits + s.misses == sum(len(set(x.tolist())) for x in _routing(model, IDS, 12))  # counted when compiled
    if options.get("prefetch") == "lookahead":
        assert s.prefetches > 0  # the residual stream reaches the prefetcher through the op


def _routing(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The experts each MoE layer call routed to in a static decode (run eager on an unpatched twin)."""
    twin = tiny_model("mixtral")
    seen: list[torch.Tensor] = []
    handles = [b.router.register_forward_hook(lambda m, a, out: seen.append(out[2].flatten()))
               for b in find_moe_blocks(twin)]  # fmt: skip
    static_decode(twin, ids, steps)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("standin", ["drop", "lowrank", "quant", "lowbit"])
def test_a_lossy_standin_compiled_equals_it_eager(patched, standin):
    model = tiny_model("mixtral")
    handle = patched(model, budget=0.5, device="cpu", standin=standin, prefetch=None)
    eager = static_decode(model, IDS, 12)
    assert handle.stats().substituted > 0  # the stand-in really served misses
    handle.unpatch()
    patched(model, budget=0.5, device="cpu", standin=standin, prefetch=None, compile=True)
    compiled = static_decode(model, IDS, 12)
    # Whether the real expert's background copy lands before a given step depends on thread timing (a loaded
    # machine delays it), and a landed expert serves its pairs exactly instead of by the stand-in: the logits agree
    # to float32 rounding when the timing does (a quiet run), else within the stand-in's own error. So the tokens
    # agree up to a step whose top two logits are that close, where the two runs may pick either.
    atol = 2e-2
    differ = (compiled[1] != eager[1]).nonzero()
    same = int(differ[0]) if len(differ) else len(eager[1])
    torch.testing.assert_close(compiled[0][: same + 1], eager[0][: same + 1], rtol=0, atol=atol)
    if same < len(eager[1]):
        top2 = eager[0][same].topk(2).values
        assert top2[0] - top2[1] <= 2 * atol, (same, top2)


@pytest.mark.parametrize(("budget", "options"), [(1.0, {}), (0.5, {"miss_path": "auto", "prefetch": "lookahead"})])
def test_no_recompilation_after_warmup_in_a_100_step_decode(patched, budget, options):
    model = tiny_model("mixtral")
    patched(model, budget=budget, device="cpu", compile=True, **options)
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    token = torch.tensor([[5]])
    with torch.no_grad():
        for t in range(3):  # warm-up: the first call and the static cache's first update compile
            model(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([[t]]))
        before = compiles()
        for t in range(3, 103):
            logits = model(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([[t]])).logits
            token = logits[:, -1:].argmax(-1)
    assert compiles() == before


def test_unpatch_restores_an_uncompiled_model_exactly_and_leaves_dynamo_settings_as_they_were(patched):
    settings = torch._dynamo.config.get_config_copy()
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = static_decode(model, IDS, 6)
    handle = patched(model, budget=0.5, device="cpu", compile=True)
    static_decode(model, IDS, 6)
    handle.unpatch()
    assert torch._dynamo.config.get_config_copy() == settings  # patch(compile=True) changed no dynamo setting
    assert "forward" not in model.__dict__  # the class's own forward again, not a compiled wrapper
    assert not any(is_attached(b.experts) for b in find_moe_blocks(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    graphs = compiles()
    got = static_decode(model, IDS, 6)
    assert compiles() == graphs  # nothing compiled runs any more
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_a_model_patched_again_gets_the_same_graph_keys_and_two_patched_models_distinct_ones(patched):
    """The compiled op finds its layer's hook by a key in the graph: the smallest keys free on attach, so a model
    patched again compiles to its earlier graph (inductor's cache serves it), while two models patched at once never
    share a key."""

    def keys(handle) -> list[int]:
        return [attached_hook(b.experts).key for b in handle.blocks]

    a, b = tiny_model("mixtral"), tiny_model("mixtral")
    first = patched(a, budget=0.5, device="cpu")
    before = keys(first)
    first.unpatch()
    again = patched(a, budget=0.5, device="cpu")
    assert keys(again) == before
    other = patched(b, budget=0.5, device="cpu")
    assert not set(keys(other)) & set(keys(again))


def test_continuous_batching_runs_eager_with_compile(patched):
    model = tiny_model("mixtral")
    prompts = [[3, 5, 7, 9], [11, 13], [2, 4, 6, 8, 10, 12]]
    gen = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=-1, pad_token_id=0)

    def run() -> list[list[int]]:
        cb = ContinuousBatchingConfig(max_requests_per_batch=4, max_batch_tokens=64, num_blocks=16)
        out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, progress_bar=False)
        return [out[k].generated_tokens for k in sorted(out)]

    handle = patched(model, budget=0.5, device="cpu")
    eager = run()
    handle.unpatch()
    patched(model, budget=0.5, device="cpu", compile=True)
    graphs = compiles()
    assert run() == eager
    assert compiles() == graphs  # paged attention would break every layer's graph: the forward ran eager


def test_the_miss_op_is_never_captured_in_a_cuda_graph():
    """A CUDA graph replays kernels without the Python that decides residency: graphs holding the op stay uncaptured."""
    assert torch._C.Tag.cudagraph_unsafe in torch.ops.offload_moe.offloaded_experts.default.tags


@requires_cuda
@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_cuda_graphs_decode_equals_resident(patched, budget):
    model = tiny_model("mixtral").to("cuda")
    ids = IDS.to("cuda")
    ref_logits, ref_tokens = static_decode(model, ids, 8)
    patched(model, budget=budget, device="cuda", compile="reduce-overhead")
    for _ in range(2):  # the second pass replays the recorded graphs
        got_logits, got_tokens = static_decode(model, ids, 8)
        assert torch.equal(got_tokens, ref_tokens)
        torch.testing.assert_close(got_logits, ref_logits, rtol=0, atol=1e-4)
