"""The workload's kernels and their cost for one Qwen2.5-7B layer, against FLOPs and bytes
worked out by hand; the KV pool's bookkeeping."""

import pytest

from flexnpu.workload.instance import KvPool
from flexnpu.workload.model import MODELS, Chunk, kernel_library_text, model_by_name, step_kernels

Q7 = MODELS["qwen2.5-7b"]
PER_LAYER = 11  # norm, qkv, rope, attention, o, add, norm, gate_up, silu_mul, down, add


def layer(ks, i=0):
    return ks[1 + i * PER_LAYER: 1 + (i + 1) * PER_LAYER]


def test_config_facts():
    assert Q7.params == pytest.approx(7.6e9, rel=0.01)  # Qwen2.5-7B: 7.61B parameters
    assert Q7.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344
    assert model_by_name("qwen2.5-7b:2").layers == 2
    assert model_by_name("qwen2.5-72b").hidden == 8192
    with pytest.raises(ValueError):
        model_by_name("llama")


def test_prefill_layer_by_hand():
    s = 512
    ks = step_kernels(Q7, (Chunk(s, s),))
    assert len(ks) == 1 + 28 * PER_LAYER + 2
    lay = layer(ks)
    assert [k.name for k in lay] == ["input_rmsnorm", "qkv_proj", "rope", "attention_prefill", "o_proj",
                                     "residual_add", "post_attention_rmsnorm", "gate_up_proj", "silu_mul",
                                     "down_proj", "residual_add"]
    flops = {
        "input_rmsnorm": 4 * 512 * 3584,
        "qkv_proj": 2 * 512 * 4608 * 3584,          # q 3584 + k 512 + v 512 outputs
        "rope": 3 * 512 * 32 * 128,                 # 28 q heads + 4 k heads
        "attention_prefill": 2 * 28 * 512 * 512 * 128,
        "o_proj": 2 * 512 * 3584 * 3584,
        "gate_up_proj": 2 * 512 * 37888 * 3584,
        "silu_mul": 4 * 512 * 18944,
        "down_proj": 2 * 512 * 3584 * 18944,
    }
    nbytes = {
        "input_rmsnorm": (2 * 512 * 3584 + 3584) * 2,
        "qkv_proj": (512 * 3584 + 3584 * 4608 + 512 * 4608) * 2,
        "rope": 2 * 512 * 32 * 128 * 2,
        "attention_prefill": (2 * 28 * 512 * 128 + 2 * 4 * 512 * 128) * 2,
        "o_proj": (512 * 3584 + 3584 * 3584 + 512 * 3584) * 2,
        "gate_up_proj": (512 * 3584 + 3584 * 37888 + 512 * 37888) * 2,
        "silu_mul": 3 * 512 * 18944 * 2,
        "down_proj": (512 * 18944 + 18944 * 3584 + 512 * 3584) * 2,
    }
    by = {k.name: k for k in lay}
    for name in flops:
        assert by[name].flops == flops[name], name
        assert by[name].hbm_bytes == nbytes[name], name
    adds = [k for k in lay if k.name == "residual_add"]
    assert [(k.flops, k.hbm_bytes) for k in adds] == [(512 * 3584, 3 * 512 * 3584 * 2)] * 2
    # the LM head: the prompt's last token only
    assert (ks[-1].name, ks[-1].flops) == ("lm_head", 2 * 1 * 152064 * 3584)
    total = sum(k.flops for k in lay)
    assert total == sum(flops.values()) + 4 * 512 * 3584 + 2 * 512 * 3584


def test_decode_layer_by_hand():
    ks = step_kernels(Q7, (), (1000,) * 8)
    by = {k.name: k for k in layer(ks)}
    assert by["qkv_proj"].flops == 2 * 8 * 4608 * 3584
    assert by["qkv_proj"].hbm_bytes == (8 * 3584 + 3584 * 4608 + 8 * 4608) * 2  # weights dominate
    a = by["attention_decode"]
    assert a.flops == 4 * 8 * 28 * 1000 * 128
    assert a.hbm_bytes == (2 * 8 * 4 * 1000 * 128 + 2 * 8 * 28 * 128) * 2  # the KV cache read
    assert by["gate_up_proj"].hbm_bytes == (8 * 3584 + 3584 * 37888 + 8 * 37888) * 2
    assert ks[-1].flops == 2 * 8 * 152064 * 3584


def test_mixed_step_and_ragged_decode():
    ks = step_kernels(Q7, (Chunk(64, 192, last=False),), (100, 301))
    lay = layer(ks, 0)
    names = [k.name for k in lay]
    assert "attention_prefill_chunk" in names and "attention_decode" in names
    t = 64 + 2
    assert {k.name: k for k in lay}["qkv_proj"].flops == 2 * t * 4608 * 3584
    chunk = {k.name: k for k in lay}["attention_prefill_chunk"]
    keys = 64 * 128 + 64 * 65 / 2  # query i sees 128 + i + 1 keys
    assert chunk.flops == 4 * 28 * 128 * keys
    dec = {k.name: k for k in lay}["attention_decode"]
    assert dec.flops == 4 * 2 * 28 * 201 * 128  # mean context, rounded up
    assert ks[-1].flops == 2 * 2 * 152064 * 3584  # the chunk is not the prompt's last: no logits
    assert step_kernels(Q7) == []


def test_kernel_library_names_phases():
    text = kernel_library_text()
    assert text.startswith("flexnpu-kernels 1\n")
    assert "kernel attention_prefill " in text and "kernel attention_decode " in text


def test_kv_pool_first_fit_and_coalescing():
    p = KvPool(100)
    assert p.reserve(1, 40) == 0 and p.reserve(2, 40) == 40
    assert p.reserve(3, 30) is None  # 20 left
    p.free(1)
    assert p.reserve(3, 30) == 0
    p.free(2)
    p.free(3)
    assert p.free_ranges == [[0, 100]] and p.used == 0
