"""Several cards in one box: one process per card over torch.distributed, each running the same model with
its ShardExecutor (experts/shard.py) of one MultiPlan (experts/multi_placement.py). docs/multi-gpu.md.

    run = CardRun("preset:tiny-qwen3-moe", cards=2, budgets=parse_card_budgets("24,12", 2),
                  modes=("auto",), prompts=((5, 17, 300),), max_tokens=16)
    results = run_on_cards(run)     # [per card] {"device", "modes": {mode: {"plan", "requests": [...]}}}
    # each request: {"prompt" (ids), "tokens" (greedy ids), "text" (their decoding, None without a
    #                tokenizer), "logits" [V] (the prompt's last position, fp32), "prompt_tps", "decode_tps"}
A prompt is token ids, a text (encoded by the model's tokenizer) or chat messages ([{"role", "content"}],
through its chat template): `hotexperts generate --vram-budget 24,12` sends its prompt as text.

Backends: "gloo" with every card's process on the CPU ("cards" emulated: the CI path) or "nccl" with card r
on cuda:r (NVLink multicast off: NCCL_NVLS_ENABLE=0 unless set); None picks nccl when CUDA has enough
devices. Every process loads the model itself (same source and seed -> the same weights), measures what its
dense part, KV cache and workspace take (its `reserved`), and card 0 solves the plan over everyone's
reserved bytes and broadcasts it, so every card runs one plan. The dense part runs replicated on every card;
every MoE layer ends in one all-reduce, so the cards' hidden states, logits and greedy tokens agree.

The launcher (`launch`) spawns the processes (torch.multiprocessing, spawn), meets them through a file
store in a fresh directory (no port to pick or race for), and never hangs: a rank that raises ends the run
at once (the others are terminated, the error is re-raised as ExpertComputeError with the rank's
traceback), and a run past `timeout_s` is killed (collectives time out after `timeout_s` too).

    python -m hotexperts.engine.multi_gpu --model M --cards 2 --vram-budget 24,12 --modes sharded,pools \
        --prompt-tokens 512 -n 128            # the GPU run: plan and prompt / decode tok/s per mode
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hotexperts.config import KernelOptions, physical_cores
from hotexperts.engine.engine import DEFAULT_MAX_CONTEXT, Engine, load_source, resolve_dtype, vram_reserved
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import ExpertComputeError, HotExpertsError, PlacementError
from hotexperts.experts.build import quantized_store
from hotexperts.experts.multi_placement import CostInputs, ShardSizes, parse_card_budgets, plan_cards
from hotexperts.experts.profile import load_profile
from hotexperts.experts.shard import ShardExecutor, column_granularity

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class CardRun:
    """What every card's process runs (picklable: it is sent to each)."""

    source: str
    cards: int
    budgets: tuple[int | None, ...]
    modes: tuple[str, ...] = ("auto",)
    prompts: tuple[tuple[int, ...] | str | tuple[dict, ...], ...] = ()   # ids, text or chat messages
    max_tokens: int = 16
    dtype: str = "float32"
    backend: str | None = None
    max_context: int | None = None
    seed: int = 0
    expert_quant: str = "none"
    profile: str | None = None            # routing counts (a routing profile) choose the resident experts
    prefill_chunk: int | None = None
    cost: CostInputs = field(default_factory=CostInputs)
    timeout_s: float = 120.0              # the whole run's limit (and so each collective's)

    def __post_init__(self):
        if self.cards < 1 or len(self.budgets) != self.cards:
            raise HotExpertsError(f"{len(self.budgets)} budget(s) for {self.cards} card(s): give one per "
                                  "card")
        if self.backend is not None and self.backend not in BACKENDS:
            raise HotExpertsError(f"the backend must be gloo or nccl, got {self.backend!r}")

    @property
    def resolved_backend(self) -> str:
        if self.backend is not None:
            return self.backend
        return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= self.cards else "gloo"


# ---- one card's process ----------------------------------------------------------------------------------
def card_device(run: CardRun, rank: int) -> torch.device:
    if run.resolved_backend == "gloo":
        return torch.device("cpu")
    if torch.cuda.device_count() <= rank:
        raise HotExpertsError(f"card {rank} asked for but CUDA has {torch.cuda.device_count()} device(s)")
    return torch.device("cuda", rank)


def card_threads(run: CardRun, rank: int) -> int:
    """Host threads of card `rank`'s process. gloo: the cores shared out (the emulated cards compute on the
    CPU at once; more threads than cores stall every rank). nccl: the CPU card computes the cold experts
    on the cores the others' driving threads leave; the others need one thread."""
    cores = physical_cores()
    if run.resolved_backend == "gloo":
        return max(1, cores // run.cards)
    return max(1, cores - run.cards + 1) if rank == 0 else 1


def card_main(rank: int, run: CardRun, store_dir: str, out_dir: str) -> None:
    """The process of card `rank`: join the group, run every mode's requests, save the results."""
    device = card_device(run, rank)
    torch.set_num_threads(card_threads(run, rank))
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(device)
    dist.init_process_group(run.resolved_backend, init_method=f"file://{store_dir}/rendezvous", rank=rank,
                            world_size=run.cards, timeout=datetime.timedelta(seconds=run.timeout_s))
    try:
        result = {"device": str(device), "modes": run_modes(run, rank, device)}
        torch.save(result, Path(out_dir) / f"card{rank}.pt")
    except HotExpertsError as e:      # a user's error (e.g. a budget too small): the launcher reports it
        (Path(out_dir) / f"error{rank}.txt").write_text(f"{type(e).__name__}\n{e}")
        raise
    finally:
        dist.destroy_process_group()


def run_modes(run: CardRun, rank: int, device: torch.device) -> dict:
    """Every mode of `run` on this card: {mode: {"plan", "requests"}}. Collective: every card calls it."""
    loaded = load_source(run.source, resolve_dtype(run.dtype), device, run.seed)
    store = quantized_store(loaded.store, run.expert_quant)
    ctx = run.max_context or min(loaded.cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    reserved = sum(vram_reserved(loaded, ctx, resolve_dtype(run.dtype), device).values())
    every = [None] * run.cards
    dist.all_gather_object(every, reserved)
    out = {}
    for mode in run.modes:
        plan = shared_plan(run, rank, loaded.cfg, store, every, mode)
        options = KernelOptions(cpu_threads=card_threads(run, rank))
        ex = ShardExecutor(plan, rank, store, device, all_reduce=dist.all_reduce, options=options)
        engine = Engine.from_loaded(loaded, device, executor=ex, max_context=ctx, use_cuda_graph=False)
        if run.prefill_chunk:
            engine.generator.prefill_chunk = run.prefill_chunk
        out[mode] = {"plan": plan, "requests": [request(engine, p, run.max_tokens) for p in run.prompts]}
    return out


def shard_sizes(cfg, store) -> ShardSizes:
    """What the plan needs of the model: MoE layers, E, I, one expert's bytes, top-k, w2's column group."""
    return ShardSizes(tuple(store.layers), store.num_experts, cfg.moe_intermediate_size, store.expert_nbytes,
                      cfg.top_k, column_granularity(store.layer(store.layers[0]).w2))


def shared_plan(run: CardRun, rank: int, cfg, store, reserved: Sequence[int], mode: str):
    """Card 0 solves the plan and broadcasts it: every card runs the very same one."""
    box = [None]
    if rank == 0:
        routing = None if run.profile is None else load_profile(run.profile, store.num_experts).counts
        box[0] = plan_cards(shard_sizes(cfg, store), run.budgets, tuple(reserved), mode=mode, routing=routing,
                            cost=run.cost)
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A CardRun prompt as token ids: ids as they are, a text encoded, chat messages through the template."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
        if tokenizer is None:
            raise HotExpertsError("this model has no tokenizer: give the prompt as token ids")
        return tokenizer.encode(prompt) if isinstance(prompt, str) else tokenizer.encode_chat(list(prompt))
    return list(prompt)


def request(engine: Engine, prompt, max_tokens: int) -> dict:
    """One greedy request: the prompt's last logits (a separate prefill) and the generated ids, timed."""
    ids = prompt_ids(engine.tokenizer, prompt)
    logits = engine.prefill(ids).float().cpu()
    tokens = list(engine.generate(ids, SamplingParams(max_tokens=max_tokens)))
    last = engine.stats()["last"]
    text = None if engine.tokenizer is None else engine.tokenizer.decode(tokens)
    return {"prompt": tuple(ids), "tokens": tokens, "text": text, "logits": logits,
            "prompt_tps": last["prompt_tok_per_s"], "decode_tps": last["gen_tok_per_s"]}


# ---- the launcher ----------------------------------------------------------------------------------------
def launch(fn: Callable, nprocs: int, args: tuple, timeout_s: float) -> None:
    """fn(rank, *args) in `nprocs` spawned processes; raises ExpertComputeError naming the failed rank (the
    others are terminated) or the timeout (every process killed)."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise ExpertComputeError(f"the {nprocs}-card run did not finish within {timeout_s:g} s")
    except mp.ProcessRaisedException as e:
        raise ExpertComputeError(f"card {e.error_index} failed:\n{e}") from None
    except mp.ProcessExitedException as e:
        raise ExpertComputeError(f"card {e.error_index} exited with code {e.exit_code}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


def run_on_cards(run: CardRun) -> list[dict]:
    """`run` on run.cards processes; every card's results, in card order (module doc)."""
    with tempfile.TemporaryDirectory(prefix="hotexperts-cards-") as tmp:
        store_dir, out_dir = Path(tmp, "store"), Path(tmp, "out")
        store_dir.mkdir()
        out_dir.mkdir()
        try:
            launch(card_main, run.cards, (run, str(store_dir), str(out_dir)), run.timeout_s)
        except ExpertComputeError:
            user_error(out_dir, run.cards)
            raise
        return [torch.load(out_dir / f"card{r}.pt", weights_only=False) for r in range(run.cards)]


def user_error(out_dir: Path, cards: int) -> None:
    """Raise the first card's own HotExpertsError (e.g. a PlacementError), if a card wrote one: when one card
    stops on bad input the others fail on the closed connection, and the launcher may see theirs first."""
    for r in range(cards):
        f = out_dir / f"error{r}.txt"
        if f.exists():
            kind, _, msg = f.read_text().partition("\n")
            cls = PlacementError if kind == "PlacementError" else HotExpertsError
            raise cls(msg if msg.startswith(f"card {r}") else f"card {r}: {msg}") from None


# ---- the GPU run command ---------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    gen = torch.Generator().manual_seed(a.seed)
    prompt = tuple(torch.randint(0, 1000, (a.prompt_tokens,), generator=gen).tolist())
    try:
        run = CardRun(a.model, a.cards, parse_card_budgets(a.vram_budget, a.cards), tuple(a.modes.split(",")),
                      (prompt,), a.n, a.dtype, a.backend, a.ctx_size, a.seed, a.expert_quant, a.moe_profile,
                      timeout_s=a.timeout)
        results = run_on_cards(run)
    except HotExpertsError as e:
        print(f"error: {e}")
        return 2
    for mode, res in results[0]["modes"].items():
        req = res["requests"][0]
        print(f"[{mode}] {res['plan'].describe()}")
        print(f"[{mode}] {a.cards} card(s) on {results[0]['device']}: prompt {a.prompt_tokens} tokens "
              f"{req['prompt_tps']:.1f} tok/s | decode {len(req['tokens'])} tokens "
              f"{req['decode_tps']:.1f} tok/s")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hotexperts.engine.multi_gpu",
                                description="one model over several cards (docs/multi-gpu.md)")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--cards", type=int, default=2)
    p.add_argument("--vram-budget", default=None, help="per card, e.g. 24,12 (GiB), or one for all")
    p.add_argument("--modes", default="auto", help="comma list of auto, sharded, pools")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("-n", type=int, default=128, help="tokens to generate")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument("--ctx-size", "-c", type=int, default=None)
    p.add_argument("--expert-quant", default="none")
    p.add_argument("--moe-profile", default=None, help="its routing counts pick the resident experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0)
    return p


if __name__ == "__main__":
    raise SystemExit(main())
