"""Load a Hugging Face MoE model directory into a dense MoETransformer plus a host ExpertStore.

    lm = load_model(path, dtype="bfloat16", device=None)
    lm.cfg (ModelConfig), lm.model (MoETransformer on `device`, eval mode), lm.store (ExpertStore, CPU),
    lm.tokenizer (Tokenizer | None when the directory has none), lm.generation_config (dict), lm.path

Tensors stream one at a time from memory-mapped safetensors: dense ones are copied into preallocated
parameters on `device`, expert ones into preallocated stacked host tensors w13 [E, 2I, D] / w2 [E, D, I],
so at most one checkpoint tensor exists twice. Every tensor is checked against the expected shape;
missing tensors raise one ModelLoadError.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hotexperts.config import ModelConfig
from hotexperts.errors import ModelLoadError, about
from hotexperts.experts.store import ExpertStore
from hotexperts.loading import validate
from hotexperts.loading.safetensors_dir import SafetensorsDir
from hotexperts.models import get_arch, transforms
from hotexperts.models.naming import ExpertRef
from hotexperts.models.split import expert_act
from hotexperts.models.transformer import MoETransformer
from hotexperts.tokenizer import Tokenizer
from hotexperts.weights import LayerExperts

EMBEDDING = "model.embed_tokens.weight"
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass
class LoadedModel:
    cfg: ModelConfig
    model: MoETransformer
    store: ExpertStore
    tokenizer: Tokenizer | None
    generation_config: dict = field(default_factory=dict)
    path: Path | None = None
    hf_config: dict = field(default_factory=dict)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_device(device=None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def empty_model(cfg: ModelConfig) -> MoETransformer:
    """MoETransformer whose parameters are placeholders, to be replaced by `materialize`.

    Large models are built on the meta device (non-persistent CPU buffers stay real); small ones on the
    CPU, which skips the meta device's one-time start-up cost (seconds).
    """
    D, hd = cfg.hidden_size, cfg.head_dim
    dense = 2 * cfg.vocab_size * D + cfg.num_layers * D * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    if dense < 20_000_000:
        return MoETransformer(cfg)
    with torch.device("meta"):
        return MoETransformer(cfg)


def materialize(model: MoETransformer, tensors: dict[str, torch.Tensor], device: torch.device):
    """Assign `tensors` as the model's parameters; move remaining buffers to `device`; eval mode."""
    model.load_state_dict(tensors, strict=True, assign=True)
    for mod in model.modules():
        for k, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[k] = b.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def empty_experts(cfg: ModelConfig, dtype: torch.dtype) -> dict[int, LayerExperts]:
    """Stacked host tensors per MoE layer (and b13 [E, 2I] for experts with biases), the config's act."""
    E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    def bias():
        return torch.empty(E, 2 * I, dtype=dtype) if cfg.expert_bias else None

    return {l: LayerExperts(torch.empty(E, 2 * I, D, dtype=dtype), torch.empty(E, D, I, dtype=dtype), bias(),
                            expert_act(cfg)) for l in cfg.moe_layers}


def expert_target(cfg: ModelConfig, experts: dict[int, LayerExperts], ref: ExpertRef) -> torch.Tensor:
    """The view of the stacked host tensors that `ref` fills: [I, D], [D, I], [E, I, D], [E, 2I, D]..."""
    if ref.layer not in experts:
        raise ModelLoadError(f"expert weights found for layer {ref.layer}, which is not an MoE layer")
    if ref.expert is not None and not 0 <= ref.expert < cfg.num_experts:
        raise ModelLoadError(f"expert {ref.expert} of layer {ref.layer} is out of range "
                             f"(config has {cfg.num_experts} experts)")
    le, I = experts[ref.layer], cfg.moe_intermediate_size
    idx = slice(None) if ref.expert is None else ref.expert
    if ref.which.endswith("_bias") and le.b13 is None:
        raise ModelLoadError(f"expert biases found for layer {ref.layer}, whose config has none")
    return {"gate": lambda: le.w13[idx, ..., :I, :], "up": lambda: le.w13[idx, ..., I:, :],
            "gate_up": lambda: le.w13[idx], "down": lambda: le.w2[idx],
            "gate_up_bias": lambda: le.b13[idx], "gate_bias": lambda: le.b13[idx, ..., :I],
            "up_bias": lambda: le.b13[idx, ..., I:]}[ref.which]()


def copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """dst.copy_(src) after a shape check; stacked 3-D tensors may come transposed ([E, D, 2I])."""
    if src.shape != dst.shape:
        if src.dim() == 3 and src.transpose(-1, -2).shape == dst.shape:
            src = src.transpose(-1, -2)
        else:
            raise ModelLoadError(f"tensor {name!r} has shape {list(src.shape)}, expected {list(dst.shape)}")
    dst.copy_(src)


def load_model(path: str | Path, dtype: str | torch.dtype = "bfloat16", device=None,
               progress: bool = True, host_embedding: bool = False) -> LoadedModel:
    """host_embedding: keep the token embedding in host memory (models/transforms.host_embedding) for an
    untied model; it is read straight into host memory, never onto the device. Every error names the
    directory."""
    with about(path):
        return _load_model(path, dtype, device, progress, host_embedding)


def _load_model(path, dtype, device, progress: bool, host_embedding: bool) -> LoadedModel:
    d = SafetensorsDir(path)
    arch = get_arch(d.config.get("model_type"))
    cfg = arch.config_from_hf(d.config)
    validate.check_model_config(cfg, d.path / "config.json", d.nbytes(), "safetensors")
    dt, dev = parse_dtype(dtype), default_device(device)
    model = empty_model(cfg)
    host = {EMBEDDING} if host_embedding and not cfg.tie_word_embeddings else set()
    dense = {k: torch.empty(v.shape, dtype=dt, device="cpu" if k in host else dev)
             for k, v in model.state_dict().items()}
    experts = empty_experts(cfg, dt)
    filled: set = set()
    ignored: list[str] = []
    # the bar only on a terminal (disable=None), closed on an error too: no stale 'loading: 0%' in logs
    shown = None if progress else True
    with tqdm(d.names(), desc="loading", unit="tensor", disable=shown, leave=False) as bar:
        _fill(cfg, arch, d, bar, dense, experts, filled, ignored)
    _check_complete(cfg, dense, filled)
    if ignored:
        warnings.warn(ignored_message(ignored), stacklevel=2)
    tok = _tokenizer(d)
    model = materialize(model, dense, dev)
    if host:
        transforms.host_embedding(model, dev)
    return LoadedModel(cfg, model, ExpertStore(experts), tok, d.generation_config, d.path, d.config)


def _fill(cfg, arch, d, names, dense: dict, experts: dict, filled: set, ignored: list) -> None:
    """Copy every checkpoint tensor into its dense or expert target (unused ones into `ignored`)."""
    for name in names:
        ref = arch.rename(name)
        beyond = isinstance(ref, ExpertRef) and ref.layer >= cfg.num_layers       # an MTP block's experts
        if ref is None or beyond or (isinstance(ref, str) and ref not in dense):
            ignored.append(name)
            continue
        dst = expert_target(cfg, experts, ref) if isinstance(ref, ExpertRef) else dense[ref]
        copy_checked(dst, arch.from_hf(cfg, name, d.get(name)), name)
        filled.add(ref)


def ignored_message(names: list[str]) -> str:
    """One warning for every checkpoint tensor the model does not use, counted by part (a VLM's vision
    tower `model.visual`, an MTP block `mtp`, ...)."""
    parts: dict[str, int] = {}
    for n in names:
        head = n.split(".")
        part = ".".join(head[:2]) if head[0] == "model" and len(head) > 2 else head[0]
        parts[part] = parts.get(part, 0) + 1
    counts = ", ".join(f"{p}.*: {c}" for p, c in sorted(parts.items()))
    return f"ignored {len(names)} tensor(s) not used by the model ({counts}), e.g. {names[0]!r}"


def _check_complete(cfg: ModelConfig, dense: dict, filled: set) -> None:
    missing = [k for k in dense if k not in filled]
    for l in cfg.moe_layers:
        if not _layer_complete(cfg, l, filled):
            missing.append(f"experts of layer {l}")
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint lacks tensor(s): {', '.join(missing[:5])}{more}")


def _layer_complete(cfg: ModelConfig, l: int, filled: set) -> bool:
    def have(which: str) -> bool:
        return ExpertRef(l, None, which) in filled or all(
            ExpertRef(l, e, which) in filled for e in range(cfg.num_experts))

    bias = not cfg.expert_bias or have("gate_up_bias") or (have("gate_bias") and have("up_bias"))
    return (have("gate_up") or (have("gate") and have("up"))) and have("down") and bias


def _tokenizer(d: SafetensorsDir) -> Tokenizer | None:
    if not (d.path / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(d.path, generation_config=d.generation_config)
