"""load() opens a checkpoint with experts memory-mapped: same logits as from_pretrained, expert bytes left on disk."""

import json
import mmap
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

import offload_moe
from tests.helpers import DEVICES, generate, logits, tiny_model
from tests.page_cache import cached_fraction, drop_cache


@pytest.mark.parametrize("read", ["pread", "mmap"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_load_matches_from_pretrained(tmp_path, family, read, loaded):
    tiny_model(family).save_pretrained(tmp_path)  # transformers writes the per-expert layout (w1/w3/w2, ...)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    model, handle = loaded(tmp_path, budget=0.25, device="cpu", read=read)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=1e-5)
    assert handle.stats().misses > 0
    handle.unpatch()  # experts are materialised from the checkpoint: the model equals from_pretrained's
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)


def test_load_fused_layout_and_dtype(tmp_path, loaded):
    model = tiny_model("mixtral")
    model.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}  # fused keys: experts.gate_up_proj
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 128, (1, 16))
    model, handle = loaded(tmp_path, budget=0.5, device="cpu", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert torch.equal(logits(model, ids), logits(ref, ids))
    handle.unpatch()


def test_load_keeps_experts_on_disk(tmp_path, loaded):
    """A checkpoint whose experts are ~100 MB: opening it at budget 1/8 reads only about that eighth into RAM."""
    _save_mixtral(tmp_path, intermediate=2048)
    expert_bytes = 4 * 8 * 3 * 256 * 2048 * 4
    rss_before = _rss_bytes()
    model, handle = loaded(tmp_path, budget=0.125, device="cpu")
    grown = _rss_bytes() - rss_before
    assert handle.stats().resident_bytes <= expert_bytes / 8
    assert grown < 0.4 * expert_bytes, f"RSS grew by {grown / 1e6:.0f} MB for {expert_bytes / 1e6:.0f} MB of experts"
    handle.unpatch()


@pytest.mark.parametrize("read", ["pread", "mmap"])
def test_pread_releases_the_page_cache_the_memory_map_keeps(tmp_path, loaded, read):
    """Decoding at budget 1/4 with the file's page cache dropped first: `read="mmap"` leaves every expert it copied
    cached (the whole file here); `read="pread"` releases what it read, leaving only the kernel's readahead past each
    read (up to this disk's read_ahead_kb, 8 MB here; reading without readahead ran at a third of the speed)."""
    _save_mixtral(tmp_path, intermediate=1024)  # experts: 4 x 8 x 3 x 256 x 1024 x 4 B = 101 MB of 102
    shard = next(tmp_path.glob("*.safetensors"))
    drop_cache(shard)
    model, handle = loaded(tmp_path, budget=0.25, device="cpu", read=read)
    generate(model, torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0)), n=8)
    s = handle.stats()
    assert s.copies > 2 * s.slots  # the slots were refilled: many more experts read than they hold
    cached = cached_fraction(shard)
    if read == "pread":
        assert cached < 0.5, f"{cached:.0%} of the checkpoint is still in the page cache"
    else:
        assert cached > 0.9, f"only {cached:.0%} of the checkpoint is in the page cache"


def test_an_unknown_read_mode_is_refused(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="read='direct' is not one of"):
        offload_moe.load(tmp_path, budget=0.5, device="cpu", read="direct")


def _save_mixtral(path, intermediate: int) -> None:
    """A float32 Mixtral of 4 layers, hidden 256, 8 experts of `intermediate`, saved as transformers saves it."""
    sizes = {"vocab_size": 64, "hidden_size": 256, "intermediate_size": intermediate, "num_hidden_layers": 4}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2}
    cfg = MixtralConfig(**sizes, **heads)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(path)


def _rss_bytes() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        offload_moe.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny_model("mixtral").config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        offload_moe.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        offload_moe.load(tmp_path)
    save_file({"unrelated": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no weights found for expert 0"):
        offload_moe.load(tmp_path)


def test_a_checkpoint_missing_shards_is_refused_before_anything_is_read(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path, max_shard_size="20KB")  # several shards and their index
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    for shard in shards[1:3]:
        shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing 2 of the {len(shards)} shards") as e:
        offload_moe.load(tmp_path)
    assert shards[1].name in str(e.value) and "finish the download" in str(e.value)


def test_stats_report_storage_reads_and_resident_memory(loaded, tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    for shard in tmp_path.glob("*.safetensors"):  # written back, then out of the page cache: loading reads storage
        drop_cache(shard)
    _, handle = loaded(tmp_path, budget=0.5, device="cpu")
    s = handle.stats()
    if s.storage_read_bytes is None or s.rss_anon_bytes is None:
        pytest.skip("this system has no /proc/self/io or /proc/self/status")
    assert s.warmup_copies > 0 and s.storage_read_bytes >= s.warmup_copies * s.expert_bytes  # from the cold map
    ballast = mmap.mmap(-1, 200 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # fresh: not what malloc kept
    for page in range(0, len(ballast), 4096):
        ballast[page] = 1
    grown = handle.stats().rss_anon_bytes - s.rss_anon_bytes
    assert grown >= 190 << 20, grown
    ballast.close()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate", r"tensor model\.\S+ ends at byte \d+, but the file has \d+ bytes: the shard is truncated"),
        ("header", r"is not a readable safetensors file"),
        ("length", r"its header claims \d+ bytes, the file has \d+"),
    ],
)
def test_a_damaged_shard_is_refused_naming_the_file_and_tensor(tmp_path, damage, match):
    tiny_model("mixtral").save_pretrained(tmp_path)
    shard = next(tmp_path.glob("*.safetensors"))
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size - 5000)  # the last tensors lose their tail
    else:
        data = bytearray(shard.read_bytes())
        if damage == "header":
            data[8:12] = b"\xff\xfe{["  # not JSON any more
        else:
            data[0:8] = (len(data) * 2).to_bytes(8, "little")  # a header longer than the file
        shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=match) as err:
        offload_moe.load(tmp_path, budget=0.5, device="cpu")
    assert shard.name in str(err.value)


@pytest.mark.parametrize("ram_budget", [1.0, 0.1])
@pytest.mark.parametrize("device", DEVICES)
def test_a_ram_tier_is_lossless_and_serves_evicted_experts(tmp_path, loaded, device, ram_budget):
    """Device slots for a quarter of the experts, a RAM tier for all of them (each expert read from disk once, every
    later miss served from RAM) or for a tenth (its own evictions): the same tokens as from_pretrained."""
    tiny_model("mixtral").save_pretrained(tmp_path)  # 3 layers x 8 experts
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    model, handle = loaded(tmp_path, budget=0.25, device=device, ram_budget=ram_budget)
    assert torch.equal(generate(model, ids.to(device), n=24).cpu(), generate(ref, ids, n=24))
    s = handle.stats()
    assert s.ram_bytes == handle.store.ram.nbytes > 0 and s.ram_hits + s.ram_misses >= s.copies > 0
    if ram_budget == 1.0:
        assert s.ram_hits > 0 and s.ram_misses + s.warmup_copies <= 3 * 8  # read from disk at most once each
    else:
        assert s.ram_misses > 3 * 8 - 2  # two slots: experts leave the RAM tier and are read again


def test_ram_budget_errors_are_clear(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs read='pread'"):
        offload_moe.load(tmp_path, budget=0.5, device="cpu", read="mmap", ram_budget=0.5)
    with pytest.raises(ValueError, match="holds no expert"):
        offload_moe.load(tmp_path, budget=0.5, device="cpu", ram_budget="1KiB")
