"""Metrics: a JSONL file (optionally TensorBoard), the MFU estimate and the loss-curve PNG.

MFU (model FLOPs utilisation) counts the FLOPs a step needs, not what the hardware ran
(activation recomputation is not counted)::

    flops_per_token = 6 * N_active
                      + 12 * n_softmax_layers * H * head_dim * T        (causal QK^T and AV, fwd + bwd)
                      + 12 * n_linear_layers  * H * head_dim * head_dim (lightning: k^T v state update and q S
                                                                          readout, fwd + bwd)
    MFU = tokens_per_second * flops_per_token / (world_size * peak_flops_per_device)

``N_active`` is the number of parameters one token passes through, without the input
embedding (a lookup): every dense parameter, the router, and ``k / E`` of each stacked
expert weight. ``T`` is the training row length. The peak is ``peak_tflops`` from the run
config or, on a GPU, looked up from its name (dense bf16); on CPU the MFU is "n/a".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

#: dense bf16 peak TFLOP/s per device (datasheet values, no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 125.0, "A10": 125.0, "L4": 121.0,
               "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def active_parameters(model) -> int:
    """Parameters one token multiplies with, without the input embedding (a lookup): taken from
    ``tnl_model.parameters`` (computed from the config, so it is right under ZeRO-3 partitioning too),
    else counted from the model with ``k / E`` of every stacked expert weight."""
    cfg = model.config
    try:
        from tnl_model.parameters import parameter_breakdown

        b = parameter_breakdown(cfg)
        return int(b.active(include_embeddings=False) + b.lm_head)
    except (ImportError, TypeError, AttributeError):
        pass
    k, e = getattr(cfg, "num_experts_per_tok", 1), getattr(cfg, "num_local_experts", 1)
    embed_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    total = 0.0
    for name, p in model.named_parameters():
        if id(p) in embed_ids:
            continue
        total += _numel(p) * (k / e if ".experts." in name else 1.0)
    return int(total)


def flops_per_token(model, seq_len: int) -> float:
    cfg = model.config
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    n_full = sum(t == "full_attention" for t in layer_types)
    n_linear = len(layer_types) - n_full
    return (6.0 * active_parameters(model) + 12.0 * n_full * heads * head_dim * seq_len
            + 12.0 * n_linear * heads * head_dim * head_dim)


def peak_flops(peak_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU)."""
    if peak_tflops:
        return peak_tflops * 1e12
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        return None
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value * 1e12
    return None


class MetricsWriter:
    """Appends one JSON object per line to ``path`` (rank 0 only); mirrors scalars to TensorBoard."""

    def __init__(self, path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except Exception as err:  # noqa: BLE001 - tensorboard is optional
                print(f"TensorBoard disabled ({err}); metrics still go to {self.path}")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, default=float) + "\n")
        self._f.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"{record.get('type', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Records of a metrics file; for repeated steps (a resumed run replays steps) the last one wins."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
    if kind is not None:
        records = [r for r in records if r.get("type") == kind]
    return records


def step_losses(path: str | os.PathLike) -> dict[int, float]:
    """step -> training loss, the last record of each step winning."""
    out = {}
    for r in read_metrics(path, "train"):
        out[int(r["step"])] = float("nan") if r["loss"] is None else float(r["loss"])  # null: a skipped step
    return out


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path | None:
    """Training loss (and LM loss) per step plus validation loss; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = {}
    for r in read_metrics(metrics_path, "train"):
        train[int(r["step"])] = r
    evals = {}
    for r in read_metrics(metrics_path, "eval"):
        evals[int(r["step"])] = r
    if not train:
        return None
    steps = sorted(train)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    lm = [float("nan") if train[s]["lm_loss"] is None else train[s]["lm_loss"] for s in steps]  # null: skipped
    ax.plot(steps, lm, lw=1, alpha=0.8, label="train LM loss")
    if evals:
        es = sorted(evals)
        ax.plot(es, [evals[s]["val_loss"] for s in es], "o-", lw=1.5, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if evals:
        last = evals[max(evals)]
        title = f"{title}  (final val ppl {last['val_ppl']:.1f})".strip()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


__all__ = ["MetricsWriter", "read_metrics", "step_losses", "plot_loss_curve", "active_parameters",
           "flops_per_token", "peak_flops", "PEAK_TFLOPS"]
