"""Train small Qwen3-MoE models on real text (trace/corpora.py) on the CPU, to record routing we own.

    spec = TrainSpec(num_experts=64, top_k=4)             widths, steps, seed (defaults: a few CPU minutes)
    trained = train(spec, corpus)                          -> Trained(cfg, model, store, log)
        corpus: {domain: (train bytes, heldout bytes)}; only the train bytes are read
    model, store = trained.model, trained.store            MoETransformer (eval, no grad) + ExpertStore:
                                                           what the engine and DenseExecutor run
    trained.log                                            [(step, lm loss, aux loss)], every log_every steps

The model is hotexperts' own MoETransformer with a qwen3_moe config (byte vocabulary of 256 tokens,
softmax router with normalised top-k). Training runs it with `TrainingExperts`, an executor whose experts
are parameters (w13 [E, 2I, D], w2 [E, D, I]) computed like the DenseExecutor oracle (tokens gathered per
expert hit), and which adds the Switch-Transformer load-balancing loss per MoE layer,
    aux = E * sum_e f_e * P_e        f_e: share of the layer's (token, k) selections going to e,
                                     P_e: mean router probability of e over the batch's tokens,
so routing does not collapse onto a few experts. Sequences of `seq_len` bytes are drawn at random offsets
from the domains' train text, the same number from every domain per step. Deterministic for a seed on
one machine type (torch CPU kernels).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hotexperts.config import ModelConfig
from hotexperts.errors import HotExpertsError
from hotexperts.executor import ExpertExecutor
from hotexperts.experts.store import ExpertStore
from hotexperts.models import get_arch
from hotexperts.models.architecture import tiny_hf_config
from hotexperts.models.split import expert_act
from hotexperts.models.transformer import MoETransformer
from hotexperts.weights import LayerExperts

BYTE_VOCAB = 256


@dataclass(frozen=True)
class TrainSpec:
    num_experts: int = 64
    top_k: int = 4
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    expert_hidden: int = 64            # moe_intermediate_size (I)
    seq_len: int = 256
    seqs_per_domain: int = 2           # sequences per domain per step
    steps: int = 300
    max_seconds: float | None = None   # stop early after this much training time
    lr: float = 3e-3
    warmup: int = 20
    aux_coef: float = 0.01
    capacity_factor: float = 2.0       # training only: selections past ceil(cf * T*K / E) per expert drop
    seed: int = 0
    log_every: int = 25

    @property
    def name(self) -> str:
        return f"bytes-qwen3moe-e{self.num_experts}k{self.top_k}"


@dataclass
class Trained:
    spec: TrainSpec
    cfg: ModelConfig
    model: MoETransformer
    store: ExpertStore
    log: list[tuple[int, float, float]] = field(default_factory=list)
    seconds: float = 0.0


def model_config(spec: TrainSpec) -> ModelConfig:
    """The qwen3_moe config of `spec` (every layer MoE, byte vocabulary)."""
    if not 1 <= spec.top_k <= spec.num_experts:
        raise HotExpertsError(f"top_k must be in 1..num_experts, got k={spec.top_k}, E={spec.num_experts}")
    hf = tiny_hf_config("qwen3_moe", "Qwen3MoeForCausalLM", hidden_size=spec.hidden,
                        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                        num_key_value_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads,
                        vocab_size=BYTE_VOCAB, num_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
                        moe_intermediate_size=spec.expert_hidden, norm_topk_prob=True, decoder_sparse_step=1,
                        mlp_only_layers=[], attention_bias=False, sliding_window=None,
                        use_sliding_window=False, max_window_layers=spec.layers,
                        max_position_embeddings=4096, torch_dtype="float32")
    return get_arch("qwen3_moe").config_from_hf(hf)


class TrainingExperts(nn.Module, ExpertExecutor):
    """Executor with trainable experts (w13 [E,2I,D], w2 [E,D,I] per MoE layer) and the load-balancing loss
    of the last forward (`aux`, summed over layers). `gates[layer]` is the model's router of that layer."""

    def __init__(self, cfg: ModelConfig, gates: dict[int, nn.Module], gen: torch.Generator,
                 capacity_factor: float = 2.0):
        nn.Module.__init__(self)
        self.capacity_factor = capacity_factor
        E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts, self.act, self.gates = E, expert_act(cfg), gates
        def draw(shape, std):
            return nn.Parameter(torch.randn(shape, generator=gen) * std)

        self.w13 = nn.ParameterDict({str(l): draw((E, 2 * I, D), 1 / math.sqrt(D)) for l in cfg.moe_layers})
        self.w2 = nn.ParameterDict({str(l): draw((E, D, I), 0.1 / math.sqrt(I)) for l in cfg.moe_layers})
        self.aux = torch.zeros(())

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.aux = self.aux + self._balance_loss(layer, x, ids)
        return self._experts(layer, x, ids, weights)

    def __call__(self, layer, x, ids, weights):  # the executor seam calls the module
        return nn.Module.__call__(self, layer, x, ids, weights)

    def _balance_loss(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gates[layer](x), dim=-1, dtype=torch.float32)           # [T, E]
        share = torch.bincount(ids.flatten(), minlength=self.num_experts).float() / ids.numel()   # [E]
        return self.num_experts * (share * probs.mean(0)).sum()

    def _experts(self, layer: int, x, ids, weights) -> torch.Tensor:
        """sum_k weights[t,k] * expert_{ids[t,k]}(x[t]) as two batched matmuls over a capacity buffer
        [E, C, D], C = ceil(capacity_factor * T*K / E) (Switch/GShard): selections past an expert's
        capacity contribute 0 in training (inference computes every selection); no loop over experts."""
        w13, w2 = self.w13[str(layer)], self.w2[str(layer)]
        flat = ids.flatten()                                                            # [T*K]
        order = torch.argsort(flat, stable=True)
        expert = flat[order]
        counts = torch.bincount(flat, minlength=self.num_experts)                      # [E]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel()) - starts[expert]                              # slot within expert
        cap = max(1, math.ceil(self.capacity_factor * flat.numel() / self.num_experts))
        keep = rank < cap                                       # over capacity: dropped (training only)
        expert, rank, order = expert[keep], rank[keep], order[keep]
        tok = order // ids.shape[1]
        buf = x.new_zeros(self.num_experts, cap, x.shape[1])                            # [E, C, D]
        buf = buf.index_put((expert, rank), x[tok])
        gu = torch.bmm(buf, w13.transpose(1, 2))                                        # [E, C, 2I]
        out = torch.bmm(self.act(*gu.chunk(2, dim=-1)), w2.transpose(1, 2))             # [E, C, D]
        picked = out[expert, rank] * weights.flatten()[order, None]                     # [kept, D]
        return torch.zeros_like(x).index_add(0, tok, picked)

    def reset_aux(self) -> None:
        self.aux = torch.zeros(())

    def store(self) -> ExpertStore:
        """The trained experts as an ExpertStore (detached float32 copies)."""
        return ExpertStore({int(l): LayerExperts(self.w13[l].detach().clone(), self.w2[l].detach().clone(),
                                                 None, self.act) for l in self.w13})


def init_model(cfg: ModelConfig, gen: torch.Generator) -> MoETransformer:
    """MoETransformer with seeded weights: N(0, 1/sqrt(fan_in)) projections, N(0, 1) embedding, unit norms."""
    model = MoETransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 2:
                std = 1.0 if "embed" in name else 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.zero_()
    return model


def _batch(corpus: dict[str, tuple[bytes, bytes]], spec: TrainSpec,
           gen: torch.Generator) -> list[torch.Tensor]:
    """seqs_per_domain byte sequences [seq_len + 1] per domain, at random offsets of the train text."""
    out = []
    for name in sorted(corpus):
        data = corpus[name][0]
        if len(data) <= spec.seq_len + 1:
            raise HotExpertsError(f"domain {name!r}: {len(data)} train bytes, need more than "
                                  f"{spec.seq_len + 1}")
        for start in torch.randint(0, len(data) - spec.seq_len - 1, (spec.seqs_per_domain,), generator=gen):
            chunk = data[int(start):int(start) + spec.seq_len + 1]
            out.append(torch.frombuffer(bytearray(chunk), dtype=torch.uint8).long())
    return out


def _lr(spec: TrainSpec, step: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def batch_loss(model: MoETransformer, experts: TrainingExperts, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Next-byte cross entropy of sequences [S + 1] packed into one forward of B*S tokens: a block-diagonal
    causal mask keeps them apart (RoPE is relative, so a block's offset does not matter); the model's
    prepare / pre_experts / head pieces, with one fresh K/V pair per layer (a shared cache's in-place
    writes would break autograd's saved views)."""
    tokens = torch.cat([s[:-1] for s in seqs])
    target = torch.cat([s[1:] for s in seqs])
    T, cfg = tokens.shape[0], model.cfg
    pos = torch.arange(T)
    block = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([s.shape[0] - 1 for s in seqs]))
    mask = (block[:, None] == block[None, :]) & (pos[:, None] >= pos[None, :])       # [T, T] bool
    x, rope = model.model.embed_tokens(tokens), model.rotary(pos, torch.float32)
    for layer in model.model.layers:
        kc = torch.zeros(cfg.num_kv_heads, T, cfg.head_dim)
        h, a, ids, w = layer.pre_experts(x, rope, pos, kc, torch.zeros_like(kc), mask)
        x = h + experts(layer.layer, a, ids, w)
    return F.cross_entropy(model.head(x), target)


def train(spec: TrainSpec, corpus: dict[str, tuple[bytes, bytes]], progress=None) -> Trained:
    """Train `spec` on the corpus' train text; progress(step, lm, aux) is called every log_every steps."""
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    cfg = model_config(spec)
    model = init_model(cfg, gen)
    gates = {l: model.model.layers[l].mlp.gate for l in cfg.moe_layers}
    experts = TrainingExperts(cfg, gates, gen, spec.capacity_factor)
    params = list(model.parameters()) + list(experts.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    log, t0 = [], time.perf_counter()
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(spec, step)
        lm, aux = _step(model, experts, _batch(corpus, spec, gen), spec, opt, params)
        if step % spec.log_every == 0 or step == spec.steps - 1:
            log.append((step, lm, aux))
            if progress is not None:
                progress(step, lm, aux)
        if spec.max_seconds is not None and time.perf_counter() - t0 > spec.max_seconds:
            log.append((step, lm, aux))
            break
    return _finish(spec, cfg, model, experts, log, time.perf_counter() - t0)


def _step(model, experts, seqs, spec: TrainSpec, opt, params) -> tuple[float, float]:
    opt.zero_grad(set_to_none=True)
    experts.reset_aux()
    lm = batch_loss(model, experts, seqs)
    aux = experts.aux / len(experts.w13)
    (lm + spec.aux_coef * aux).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(lm.detach()), float(aux.detach())


def _finish(spec, cfg, model, experts, log, seconds) -> Trained:
    for p in model.parameters():
        p.requires_grad_(False)
    return Trained(spec, cfg, model.eval(), experts.store(), log, seconds)
