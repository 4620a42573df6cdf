"""Calibration's memory savings change nothing: prefix tokenisation, 16-bit reservoirs, statistics without copies."""

import pytest
import torch
from transformers import AutoTokenizer

from ann2snn.calibration.calibrate import _MALLOC_TRIM, release_memory
from ann2snn.calibration.data import bundled_text, read_texts, token_windows
from ann2snn.calibration.observers import ChannelObserver
from ann2snn.calibration.thresholds import choose_clip
from ann2snn.coding import SpikeCode
from ann2snn.models import embedded_model_path


def _whole(tokenizer, texts):
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def test_token_windows_tokenise_only_a_prefix_and_get_the_same_ids(qwen2_checkpoint):
    tokenizers = [AutoTokenizer.from_pretrained(str(qwen2_checkpoint)), AutoTokenizer.from_pretrained(str(embedded_model_path()))]
    heldout = read_texts(bundled_text("heldout.txt"))[0]
    documents = [heldout[:3000], heldout, "short one", heldout[5000:]]
    for tokenizer in tokenizers:
        whole = _whole(tokenizer, documents)
        for budget in (16, 700, 5000, 20000, len(whole) - 3, len(whole) + 100):
            windows = token_windows(tokenizer, documents, 16, max_tokens=budget)
            assert windows.flatten().tolist() == whole[: windows.numel()], budget
        # random windows out of a budget: the same windows as cut from the whole tokenisation
        windows = token_windows(tokenizer, documents, 32, samples=20, seed=3)
        full = torch.tensor(whole[: 20 * 32 * 8 // 32 * 32]).reshape(-1, 32)
        order = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(3))[:20]
        assert torch.equal(windows, full[order.sort().values])


def test_bf16_reservoir_keeps_exactly_the_values_seen_in_half_the_memory():
    torch.manual_seed(0)
    batches = [torch.randn(3, 40, 24).bfloat16() * 5 for _ in range(4)]
    half, full = ChannelObserver("s", 480, reservoir=64, seed=1), ChannelObserver("s", 480, reservoir=64, seed=1)
    for x in batches:
        half.update(x)
        full.update(x.float())
    a, b = half.statistics(), full.statistics()
    assert a["sample"].dtype == torch.bfloat16 and b["sample"].dtype == torch.float32
    for key in b:
        assert torch.equal(a[key].float(), b[key].float()), key
    code = SpikeCode("phase", 6)
    assert torch.equal(choose_clip(a, "mse", code), choose_clip(b, "mse", code))
    # the statistics are the observer's own tensors, not copies; no two of them share memory (safetensors)
    assert a["sample"] is half.sample
    pointers = [v.data_ptr() for v in a.values()]
    assert len(set(pointers)) == len(pointers)


@pytest.mark.skipif(_MALLOC_TRIM is None, reason="malloc_trim is glibc's (Linux)")
def test_release_memory_hands_freed_heap_pages_back_to_the_os():
    """glibc keeps freed heap blocks mapped; release_memory must return them (calibration's resident memory)."""
    import os

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    blocks = [bytearray(64 * 1024) for _ in range(1600)]  # 100 MiB of heap blocks (below malloc's mmap threshold)
    last = blocks.pop()  # kept: the freed blocks lie below it, where only a trim (not the heap's top) returns them
    filled = resident()
    del blocks
    freed = resident()
    release_memory()
    assert freed - resident() > 50 * 1024**2 and filled - freed < 50 * 1024**2
    del last


def test_calibration_skips_the_logits_unless_the_output_layer_is_observed(qwen2_checkpoint):
    import ann2snn
    from ann2snn.calibration.calibrate import _skip_logits
    from ann2snn.recipes import get_recipe
    from ann2snn.replace import matches

    model, _ = ann2snn.load_ann(str(qwen2_checkpoint))
    found = matches(model, get_recipe("qwen2").with_options(spiking_head=False))
    assert _skip_logits(model, found) == {"logits_to_keep": 1}
    assert _skip_logits(model, found + [("lm_head", model.lm_head, None)]) == {}
    assert _skip_logits(model, matches(model, get_recipe("qwen2"))) == {}  # the spiking head observes lm_head's input
