"""Worker for test_forced_expert_imbalance: a few ZeRO steps where every token of rank 0's batch is
forced (by a hook on each router) onto experts 0 and 1 only, so experts 2.. get no token at all on
rank 0, while rank 1 routes normally; saves the consolidated weights.

Launched with 2 processes (deepspeed launcher) or 1 process with gradient accumulation 2, so both
runs see the same two micro-batches per step. Not collected by pytest (leading underscore)."""

import argparse

import torch

from tnl_training.config import RunConfig, apply_overrides
from tnl_training.pretrain import build_deepspeed_config, build_model, init_distributed, param_groups
from tnl_training.testing import ENGINE, TINY


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--stages", type=int, nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    deepspeed = init_distributed()
    import torch.distributed as dist

    results = {}
    for stage in args.stages:  # a fresh model and engine per stage, in one launch
        results[stage] = run_stage(deepspeed, dist, stage, args.steps)
    if dist.get_rank() == 0:
        torch.save({"results": results, "world": dist.get_world_size()}, args.out)
    dist.barrier()


def run_stage(deepspeed, dist, stage, steps):
    from tnl_model import TNLConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = apply_overrides(RunConfig(), [f"zero_stage={stage}", "micro_batch_size=2",
                                        f"gradient_accumulation_steps={2 // world}", "seed=11", "grad_clip=1.0"])
    ds = build_deepspeed_config(cfg, ENGINE, world)
    model_cfg = TNLConfig.from_json_file(str(TINY))
    model_cfg.use_cache = False
    model = build_model(cfg, model_cfg, ds)
    e = model_cfg.num_local_experts
    forced_counts = torch.zeros(e, dtype=torch.long)
    force = {"on": False}

    def force_routing(module, inputs, output):
        if not force["on"]:
            return None
        logits = output[0]
        probs = torch.softmax(logits, dim=-1)
        k = model_cfg.num_experts_per_tok
        idx = torch.arange(k).expand(logits.shape[0], k)
        weight = probs[:, :k] / probs[:, :k].sum(dim=-1, keepdim=True)
        forced_counts.add_(torch.bincount(idx.reshape(-1), minlength=e))
        return logits, weight, idx

    from tnl_model.moe import TNLRouter

    for mod in model.modules():
        if isinstance(mod, TNLRouter):
            # registered before deepspeed.initialize, so ZeRO-3's own hooks see the forced outputs
            mod.register_forward_hook(force_routing)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
    # the initial weights as every rank sees them (ZeRO-3: gathered from the partitions)
    params = list(engine.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if stage == 3 else None
    if ctx is not None:
        ctx.__enter__()
    initial = {k: v.detach().clone().float() for k, v in engine.module.named_parameters()}
    if ctx is not None:
        ctx.__exit__(None, None, None)
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 + step)
        batches = torch.randint(3, model_cfg.vocab_size, (2, 2, 33), generator=gen)
        for m in range(cfg.gradient_accumulation_steps):
            which = m * world + rank          # global micro-batch 0 (forced routing) or 1 (normal routing)
            force["on"] = which == 0
            x = batches[which]
            out = engine(input_ids=x, labels=x, output_router_logits=True)
            engine.backward(out.loss)
            engine.step()
    params = list(engine.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if stage == 3 else None
    if ctx is not None:
        ctx.__enter__()
    state = {k: v.detach().clone().float() for k, v in engine.module.named_parameters()}
    if ctx is not None:
        ctx.__exit__(None, None, None)
    engine.destroy()
    return {"state": state, "initial": initial, "forced_counts": forced_counts}


if __name__ == "__main__":
    main()
