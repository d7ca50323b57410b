"""Document masking: a packed micro-batch computes what each document computes alone.

The oracle runs every document segment through the model by itself and scores the same
predictions; the packed batch (one row, ``cu_seqlens`` at row starts and BOS tokens) must give
the same mean cross-entropy. Then one short pretraining run with ``document_masking=true``.
"""

import pytest
import torch
import torch.nn.functional as F

from tnl_model.testing import build_model, random_ids, tiny_config
from tnl_training.documents import IGNORE_INDEX, pack_documents, unpack_rows
from tnl_training.metrics import read_metrics
from tnl_training.testing import run_training, write_corpus, write_run_config

BOS = 1


def _rows():
    """Three rows of 30 tokens: documents starting at row starts, mid-row, a one-token document,
    and a row that begins inside a document (no BOS at position 0)."""
    rows = random_ids(3, 30, seed=4, low=3)
    for row, positions in ((0, (0, 12)), (1, (20,)), (2, (0, 5, 6, 29))):
        rows[row, list(positions)] = BOS
    return rows


def test_pack_cuts_at_row_starts_and_bos_and_drops_cross_row_targets():
    rows = _rows()
    packed = pack_documents(rows, BOS)
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["cu_seqlens"].tolist() == [0, 12, 30, 50, 60, 65, 66, 89, 90]
    assert torch.equal(packed["input_ids"], rows.reshape(1, -1))
    ignored = (packed["labels"][0] == IGNORE_INDEX).nonzero().squeeze(1).tolist()
    assert ignored == [30, 60]
    assert torch.equal(unpack_rows(packed["input_ids"], 3), rows)
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        pack_documents(rows[0], BOS)


@torch.no_grad()
def test_packed_loss_equals_each_document_alone():
    model = build_model(tiny_config())  # lightning and softmax layers, MoE
    rows = _rows()
    batch, length = rows.shape
    packed = pack_documents(rows, BOS)
    got = model(**packed, use_cache=False).lm_loss

    flat = rows.reshape(-1)
    bounds = packed["cu_seqlens"].tolist()
    row_starts = set(range(0, batch * length, length))
    total, count = torch.zeros((), dtype=torch.float64), 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        logits = model(flat[start:stop][None], use_cache=False).logits[0]
        # each token predicts the next one, the last also the next segment's first unless a row starts there
        last = stop + 1 if stop < flat.numel() and stop not in row_starts else stop
        targets = flat[start + 1 : last]
        total += F.cross_entropy(logits[: targets.numel()], targets, reduction="sum").double()
        count += targets.numel()
    assert count == batch * (length - 1)  # the predictions of the unpacked batch, no more
    torch.testing.assert_close(got.double(), total / count, atol=1e-5, rtol=0)
    # Not vacuous: the first document of row 0 is untouched, tokens after a cut do change.
    packed_logits = unpack_rows(model(input_ids=packed["input_ids"], cu_seqlens=packed["cu_seqlens"],
                                      use_cache=False).logits, batch)
    plain_logits = model(rows, use_cache=False).logits
    torch.testing.assert_close(packed_logits[0, :12], plain_logits[0, :12], atol=1e-5, rtol=0)
    assert (packed_logits[0, 12:] - plain_logits[0, 12:]).abs().max() > 1e-2


@pytest.mark.slow
def test_pretraining_with_document_masking(prepared_corpus, tmp_path):
    # Short documents (two lines, some 30 tokens) so that every row holds several; the session's tokenizer.
    write_corpus(tmp_path / "short", n_docs=60, lines=2, seed=3)
    data = {"text_files": [str(tmp_path / "short" / "*.txt")], "shard_dir": str(tmp_path / "shards")}
    losses = {}
    for masking in (False, True):
        run_dir = tmp_path / f"masking-{masking}"
        cfg = write_run_config(tmp_path / f"{run_dir.name}.yaml", prepared_corpus, output_dir=str(run_dir),
                               max_steps=3, log_interval=1, eval_interval=3, checkpoint_interval=100, export=False,
                               document_masking=masking, micro_batch_size=4, seq_len=64, data=data)
        proc = run_training(1, ["--config", str(cfg)], log=tmp_path / f"{run_dir.name}.log")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert ("attention within documents" in proc.stdout) == masking
        records = read_metrics(run_dir / "metrics.jsonl", "train")
        losses[masking] = [r["loss"] for r in records]
        assert len(losses[masking]) == 3 and all(torch.isfinite(torch.tensor(losses[masking])))
        assert read_metrics(run_dir / "metrics.jsonl", "eval"), "no validation record"
    # Same seed, same rows: without masking the runs would agree to the bit; a random-init model
    # leans little on context, so the cut documents move the first loss by ~3e-4.
    assert abs(losses[True][0] - losses[False][0]) > 1e-5
