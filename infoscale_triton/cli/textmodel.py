"""The byte-level language model of the length-extrapolation experiments (benchmarks/extrapolation.py
trains and evaluates it; benchmarks/entropy.py reads its attention entropy): the data, the model, the
training and evaluation loops, and the checkpoints.

Data: the Python standard library's own ``*.py`` files (``sysconfig.get_paths()["stdlib"]``, without
site-packages), split by file into train and test by a hash of the relative path, as byte tokens (256
bytes + MASK + DOC, the separator between files). No downloads.

Model: a small pre-norm transformer with RoPE (rotations computed for any length) whose attention is
``infoscale_triton.scaled_dot_product_attention``, with dot-product or CosScale logits and an inference
temperature (:class:`AttentionKind`). Objective: BERT-style masked language modelling (bidirectional)
or causal next-byte prediction.
"""

from __future__ import annotations

import math
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import infoscale_triton

MASK, DOC = 256, 257  # special tokens after the 256 byte values
VOCAB = 264  # 258 used, padded to a multiple of 8
IGNORE = -100
MODELS = ("dot", "cos")
TEMPERATURES = ("none", "logn", "infoscale")


@dataclass
class Config:
    objective: str = "mlm"
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    train_len: int = 64
    batch: int = 256
    lr: float = 1e-3
    warmup: int = 200
    max_steps: int = 20000
    train_seconds: float = 170.0
    calib_steps: int = 60
    cos_scale: float = 64.0
    mask_rate: float = 0.15
    lengths: list[int] = field(default_factory=lambda: [64 * 2**i for i in range(7)])
    eval_tokens: int = 131072
    eval_batch_tokens: int = 65536
    test_fraction: float = 0.1
    max_files: int = 0  # 0 = every file
    seed: int = 0


def smoke_config(base: Config) -> Config:
    """Tiny sizes for the Triton interpreter on CPU: checks the script, not the science."""
    return Config(objective=base.objective, layers=1, d_model=32, heads=2, batch=4, warmup=1, max_steps=2,
                  train_seconds=30.0, calib_steps=1, cos_scale=base.cos_scale, lengths=[64, 128],
                  eval_tokens=256, eval_batch_tokens=256, max_files=200, seed=base.seed)


# ----------------------------------------------------------------------------------------------- data

def stdlib_files(max_files: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts))
    return files[:max_files] if max_files else files


def is_test_file(path: Path, fraction: float) -> bool:
    """Deterministic split by file: crc32 of the path relative to the stdlib root."""
    rel = path.relative_to(sysconfig.get_paths()["stdlib"]).as_posix()
    return zlib.crc32(rel.encode()) % 1000 < fraction * 1000


def token_stream(files: list[Path]) -> torch.Tensor:
    """The files' bytes, each followed by DOC, as one int16 tensor."""
    parts = []
    for path in files:
        data = path.read_bytes()
        parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16) if data else
                     torch.empty(0, dtype=torch.int16))
        parts.append(torch.tensor([DOC], dtype=torch.int16))
    return torch.cat(parts)


def load_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, dict]:
    files = stdlib_files(cfg.max_files)
    test = [p for p in files if is_test_file(p, cfg.test_fraction)]
    train = [p for p in files if not is_test_file(p, cfg.test_fraction)]
    train_tokens, test_tokens = token_stream(train), token_stream(test)
    info = {"stdlib": sysconfig.get_paths()["stdlib"], "files_train": len(train), "files_test": len(test),
            "tokens_train": train_tokens.numel(), "tokens_test": test_tokens.numel(),
            "file_list_crc32": zlib.crc32("\n".join(p.as_posix() for p in files).encode())}
    return train_tokens, test_tokens, info


def mlm_corrupt(tokens: torch.Tensor, rate: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: inputs with `rate` of the bytes selected (80% MASK, 10% random byte, 10% kept)
    and targets that are IGNORE except at the selected positions. DOC separators are never selected."""
    dev = tokens.device
    selected = (torch.rand(tokens.shape, generator=g, device=dev) < rate) & (tokens < 256)
    r = torch.rand(tokens.shape, generator=g, device=dev)
    random_bytes = torch.randint(0, 256, tokens.shape, generator=g, device=dev)
    inputs = torch.where(selected & (r < 0.8), torch.full_like(tokens, MASK), tokens)
    inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), random_bytes, inputs)
    return inputs, torch.where(selected, tokens, torch.full_like(tokens, IGNORE))


def make_example(tokens: torch.Tensor, cfg: Config, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for the objective; tokens (B, L) int64."""
    if cfg.objective == "mlm":
        return mlm_corrupt(tokens, cfg.mask_rate, g)
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE)], dim=1)
    return tokens, targets


def train_batch(stream: torch.Tensor, cfg: Config, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, stream.numel() - cfg.train_len, (cfg.batch, 1), generator=g, device=stream.device)
    tokens = stream[starts + torch.arange(cfg.train_len, device=stream.device)].long()
    return make_example(tokens, cfg, g)


def eval_set(stream: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The first eval_tokens held-out bytes, corrupted once: every length sees the same bytes and the same
    masked positions, only cut into windows of another length."""
    n = min(cfg.eval_tokens, stream.numel() // max(cfg.lengths) * max(cfg.lengths))
    g = torch.Generator(device=stream.device).manual_seed(cfg.seed + 2)
    inputs, targets = make_example(stream[:n].long().view(1, n), cfg, g)
    if cfg.objective == "clm":
        targets[0, -1] = IGNORE
    return inputs.view(-1), targets.view(-1)


# ---------------------------------------------------------------------------------------------- model

def rope_tables(length: int, head_dim: int, device: torch.device, base: float = 10000.0) -> torch.Tensor:
    """cos and sin of the rotary angles for positions 0..length-1 (any length), (2, length, head_dim/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of a (B, H, L, d) tensor, in float32."""
    cos, sin = tables
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@dataclass(frozen=True)
class AttentionKind:
    """How the attention call is made: the training-time logits and the inference temperature."""

    causal: bool
    cos_scale: float | None  # None: dot product, scale 1/sqrt(d)
    temperature: str | None = None
    train_len: int | None = None


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def attention(self, x: torch.Tensor, rope: torch.Tensor, kind: AttentionKind) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # RoPE runs in float32; the kernel wants q, k, v in one dtype (bf16 under autocast)
        q, k = apply_rope(q, rope).to(v.dtype), apply_rope(k, rope).to(v.dtype)
        out = self.attend(q, k, v, kind)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: AttentionKind) -> torch.Tensor:
        """The attention itself, on (B, H, L, d) q, k (after RoPE) and v: a method of its own so that
        benchmarks/entropy.py can wrap it per layer and read the attention entropy."""
        return infoscale_triton.scaled_dot_product_attention(
            q, k, v, is_causal=kind.causal, cos_scale=kind.cos_scale, temperature=kind.temperature,
            train_len=kind.train_len)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kind: AttentionKind) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), rope, kind)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.head_dim = cfg.d_model // cfg.heads
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, kind: AttentionKind) -> torch.Tensor:
        rope = rope_tables(tokens.shape[1], self.head_dim, tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, rope, kind)
        return self.norm(x) @ self.embed.weight.t()  # tied output head


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1), ignore_index=IGNORE)


# -------------------------------------------------------------------------------------- train and eval

def autocast(device: torch.device) -> torch.autocast:
    # bf16 on the GPU; float32 on CPU (the interpreter emulates bf16: slower)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model: Transformer, kind: AttentionKind, stream: torch.Tensor, cfg: Config,
          total_steps: int | None) -> dict:
    """Train; with total_steps None the step count is fixed after cfg.calib_steps from the throughput
    measured after compilation so as to fill cfg.train_seconds. A time budget stops the run in any case."""
    device = stream.device
    g = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # the same batches for every model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    planned = total_steps or cfg.max_steps
    losses: list[tuple[int, float]] = []
    sync(device)
    start = time.perf_counter()
    # a run given its step count may take a little longer (its own compilation, slower kernels)
    budget = cfg.train_seconds * (1.0 if total_steps is None else 1.25)
    step, warm_step, warm_time = 0, cfg.calib_steps // 5, 0.0
    stopped_by_time = False
    while step < planned:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, planned, cfg)
        inputs, targets = train_batch(stream, cfg, g)
        with autocast(device):
            loss = loss_fn(model(inputs, kind), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step in (planned, warm_step, cfg.calib_steps):
            losses.append((step, loss.item()))  # .item() syncs: only now and then
            elapsed = time.perf_counter() - start
            if step == warm_step:
                warm_time = elapsed  # the kernels are compiled by now
            if total_steps is None and step == cfg.calib_steps:
                rate = (step - warm_step) / max(1e-9, elapsed - warm_time)
                planned = max(step, min(cfg.max_steps, step + int(rate * (cfg.train_seconds - elapsed))))
            if elapsed > budget and step < planned:
                stopped_by_time = True
                break
    sync(device)
    seconds = time.perf_counter() - start
    print(f"  {step} steps in {seconds:.1f} s ({step / seconds:.1f} steps/s), last loss {losses[-1][1]:.3f}"
          + (" [stopped by the time budget]" if stopped_by_time else ""), flush=True)
    return {"steps": step, "planned_steps": planned, "seconds": seconds, "stopped_by_time": stopped_by_time,
            "loss_curve": losses}


@torch.no_grad()
def evaluate(model: Transformer, kind: AttentionKind, inputs: torch.Tensor, targets: torch.Tensor,
             length: int, cfg: Config) -> dict:
    """Loss (nats per predicted byte) and accuracy over the eval bytes cut into windows of `length`."""
    x, y = inputs.view(-1, length), targets.view(-1, length)
    rows = max(1, cfg.eval_batch_tokens // length)
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, x.shape[0], rows):
        with autocast(inputs.device):
            logits = model(x[i:i + rows], kind).float()
        tgt = y[i:i + rows]
        keep = tgt != IGNORE
        loss_sum += F.cross_entropy(logits[keep], tgt[keep], reduction="sum").item()
        correct += (logits[keep].argmax(-1) == tgt[keep]).sum().item()
        count += keep.sum().item()
    return {"loss": loss_sum / count, "accuracy": correct / count, "predicted_tokens": count,
            "sequences": x.shape[0]}


def train_model(model_name: str, cfg: Config, stream: torch.Tensor,
                total_steps: int | None) -> tuple[Transformer, dict]:
    """A fresh model of the given attention kind, trained on `stream` (see train), and its report."""
    torch.manual_seed(cfg.seed)  # the same initial weights for both models
    model = Transformer(cfg).to(stream.device)
    kind = inference_kind(model_name, "none", cfg)
    print(f"training {model_name} ({cfg.objective}, {sum(p.numel() for p in model.parameters())} "
          f"parameters, cos_scale={kind.cos_scale})", flush=True)
    return model, train(model, kind, stream, cfg, total_steps)


def save_checkpoint(path: Path, cfg: Config, states: dict[str, dict], training: dict) -> None:
    """Both models' weights (CPU state_dicts by model name) and the Config, as plain data in one file
    (torch.load(..., weights_only=True) reads it back; load_checkpoint rebuilds the models)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(cfg), "models": states, "training": training}, path)


def load_checkpoint(path: Path, device: torch.device) -> tuple[Config, dict[str, Transformer], dict]:
    """(Config, {model name: Transformer in eval mode on device}, training report) from save_checkpoint."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    cfg = Config(**ckpt["config"])
    models = {}
    for name, state in ckpt["models"].items():
        models[name] = Transformer(cfg).to(device)
        models[name].load_state_dict(state)
        models[name].eval()
    return cfg, models, ckpt.get("training", {})


def inference_kind(model_name: str, temperature: str, cfg: Config) -> AttentionKind:
    causal = cfg.objective == "clm"
    cos_scale = cfg.cos_scale if model_name == "cos" else None
    if temperature == "none":
        return AttentionKind(causal, cos_scale)
    # causal rows see fewer than train_len keys in training too: clipping leaves them as trained
    name = temperature + ("_clipped" if causal else "")
    return AttentionKind(causal, cos_scale, name, cfg.train_len)
