"""Host synchronisations: a decode step of generate() reads nothing back from the device.

On a GPU every read of a tensor's value by the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``,
an output whose size depends on the data such as ``nonzero`` or boolean indexing) waits for every
kernel queued before it, so a decode step that does one pays a full pipeline drain per token. Checks
that read values (token ids inside the vocabulary, padding in the mask) belong at the boundaries:
generate() checks the prompt once, the prefill checks its inputs, decode steps check nothing.

On the CPU nothing waits, so the test counts the operations that would: a dispatch mode sees every
aten op a forward runs (``_local_scalar_dense`` is the op behind ``item``/``bool``/``int``/``float``,
and the data-dependent-shape ops), and ``Tensor.tolist``/``numpy``/``cpu`` (which do not dispatch) are
wrapped. Everything generate() itself does between forwards is outside the count.
"""

import functools
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tnl_model.testing import build_model, random_ids, tiny_config

aten = torch.ops.aten
#: ops whose result (or whose output's size) the host must read: a device sync on CUDA
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
               aten.is_nonzero.default, aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
               aten.bincount.default, aten.repeat_interleave.Tensor, aten.histc.default}


def _origin() -> str:
    """``package/file.py:line`` of the innermost frame in tnl_model, tnl_kernels or transformers."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        for package in ("tnl_model", "tnl_kernels", "transformers"):
            if f"/{package}/" in frame.filename and "/tests/" not in frame.filename:
                return f"{package}{frame.filename.rsplit('/' + package, 1)[1]}:{frame.lineno}"
    return "elsewhere"


class SyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values while active (see the module docstring): ``reads`` holds
    ``"what @ where"`` for each."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            self.reads.append(f"{func} @ {_origin()}")
        elif func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.reads.append(f"boolean indexing @ {_origin()}")
        return func(*args, **kwargs)

    def __enter__(self):
        self._patched = {}
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            @functools.wraps(original)
            def counting(tensor, *args, _name=name, _original=original, **kwargs):
                self.reads.append(f"Tensor.{_name} @ {_origin()}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counting)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def generate_counting_reads(model, ids, **kwargs):
    """Run generate(), counting host reads per forward: ``[(number of new tokens, reads), ...]``."""
    calls = []
    forward = model.forward

    @functools.wraps(forward)
    def counted(*args, **inner):
        tokens = inner.get("input_ids") if inner.get("input_ids") is not None else inner.get("inputs_embeds")
        with SyncCounter() as counter:
            out = forward(*args, **inner)
        calls.append((tokens.shape[1], counter.reads))
        return out

    model.forward = counted
    try:
        with torch.no_grad():
            generated = model.generate(ids, **kwargs)
    finally:
        del model.forward
    return generated, calls


def test_the_counter_sees_the_reads_that_sync():
    t = torch.arange(6)
    with SyncCounter() as counter:
        bool(t.any()), t.sum().item(), t.tolist(), t[t > 2], t.nonzero(), t + 1
    assert [read.split(" @ ")[0] for read in counter.reads] == [
        "aten._local_scalar_dense.default", "aten._local_scalar_dense.default", "Tensor.tolist", "boolean indexing",
        "aten.nonzero.default"]


@pytest.mark.parametrize("layout", [None, ["linear_attention"] * 4, ["full_attention", "linear_attention"] * 2],
                         ids=["hybrid", "all_linear", "softmax_first"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_decode_steps_of_generate_read_nothing_back(layout, padded):
    model = build_model(tiny_config(**({"layer_types": layout} if layout else {})))
    ids = random_ids(2, 9)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        kwargs["attention_mask"] = mask
    generated, calls = generate_counting_reads(model, ids, **kwargs)
    assert [length for length, _ in calls] == [9, 1, 1, 1, 1]
    prefill_reads, decode_reads = calls[0][1], [reads for _, reads in calls[1:]]
    assert decode_reads == [[]] * 4, decode_reads
    # The model's own reads in the prefill: none for the token ids (generate() checked them before its loop) and,
    # padded, whether the mask holds padding (tnl_model.inputs, and again transformers' create_recurrent_attention_mask
    # when there are lightning layers). The CPU lightning operator checks its blocks for non-finite values
    # (tnl_kernels; the Triton path does not).
    model_reads = [read for read in prefill_reads if "@ tnl_kernels/" not in read]
    expected = (1 + ("linear_attention" in model.config.layer_types)) if padded else 0
    assert len(model_reads) == expected, model_reads
    # generate() checked the prompt; the forwards of its loop did not check it again
    reference = model.generate(ids, **kwargs)
    assert torch.equal(generated, reference)


def test_generate_checks_the_prompt_once_before_its_loop():
    model = build_model(tiny_config())
    ids = random_ids(1, 6)
    ids[0, 2] = 97
    with pytest.raises(ValueError, match="token id 97, outside the vocabulary"):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="token id 97, outside the vocabulary"):
        model(ids)  # a forward that is not a decode step checks its own ids


@torch.no_grad()
def test_a_decode_step_with_a_cache_skips_the_value_checks_only():
    model = build_model(tiny_config())
    cache = model(random_ids(1, 5), use_cache=True).cache
    with SyncCounter() as counter:
        model(random_ids(1, 1, seed=3), cache=cache)
    assert counter.reads == []
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.rand(1, 1), cache=cache)  # shapes and dtypes are still checked (they read no values)


@torch.no_grad()
def test_a_chunked_prefill_checks_the_whole_prompt_once():
    model = build_model(tiny_config())
    ids = random_ids(2, 40)
    with SyncCounter() as counter:
        chunked = model(ids, use_cache=True, prefill_chunk_size=10, logits_to_keep=1).logits
    model_reads = [read for read in counter.reads if "@ tnl_kernels/" not in read]
    assert len(model_reads) == 1 and "tnl_model/inputs.py" in model_reads[0], model_reads  # the ids' range, once
    torch.testing.assert_close(chunked, model(ids, use_cache=True, logits_to_keep=1).logits, atol=1e-5, rtol=0)
    ids[1, 33] = 97  # in the last chunk
    with pytest.raises(ValueError, match="token id 97, outside the vocabulary"):
        model(ids, use_cache=True, prefill_chunk_size=10)
