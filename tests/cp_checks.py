"""The context-parallel checks on several GPUs, run by torchrun: benchmarks/cp_check.py runs them alone,
benchmarks/bench_context_parallel.py --checks before its timings (see cp_check.py for what each checks).
Their budgets are the tests' (helpers.py, on infoscale_triton.testing's error budget), hence this module
lives here; the scripts put tests/ on sys.path. Every rank runs each check; rank 0 compares with the
references and records the result in the run's results file (infoscale_triton.cli.harness).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import assert_grads_match_reference, assert_matches_reference

import infoscale_triton
from infoscale_triton.cli import harness, peers
from infoscale_triton.distributed import context_parallel_attention, shard_sequence, unshard_sequence
from infoscale_triton.testing import rel_error

TRAIN_LEN = peers.N_TRAIN  # InfoScale's N, as in the anchors' runs


def low_dtype() -> torch.dtype:
    """The inputs' dtype: bf16 on GPUs; float16 through the interpreter (which emulates bf16: slower)."""
    return torch.bfloat16 if harness.on_gpu() else torch.float16


def run_check(env: harness.Ranks, out: harness.ResultsFile, name: str,
              fn: Callable[[], str | None]) -> bool:
    """Run one check on every rank; record pass / FAIL (an assertion) / ERROR (anything else), with the
    first failing rank's message. Returns whether every rank passed."""
    t0 = time.time()
    status, detail = "pass", ""
    try:
        detail = fn() or ""
    except AssertionError as e:
        status, detail = "FAIL", str(e)
    except Exception as e:  # noqa: BLE001 -- recorded; the next check still runs
        status, detail = "ERROR", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    statuses: list = [None] * env.world
    dist.all_gather_object(statuses, (status, detail))
    worst = next(((s, d) for s, d in statuses if s != "pass"), statuses[0])
    seconds = time.time() - t0
    out.log(f"{worst[0]:5s} {name} ({seconds:.1f} s) {worst[1][:3000]}")
    out.add({"name": name, "status": worst[0], "detail": worst[1], "seconds": round(seconds, 2)})
    return worst[0] == "pass"


def full_inputs(env: harness.Ranks, b: int, hq: int, hkv: int, n: int, d: int,
                seed: int) -> tuple[torch.Tensor, ...]:
    """The same q, k, v, dout on every rank (a seeded generator on the device)."""
    g = torch.Generator(device=env.device).manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        x = torch.randn(*shape, generator=g, device=env.device, dtype=torch.float32) * std
        return x.to(low_dtype())

    return (randn(b, hq, n, d, std=2.0), randn(b, hkv, n, d, std=2.0), randn(b, hkv, n, d, std=1.0),
            randn(b, hq, n, d, std=1.0))


def ring_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, method: str,
               layout: str, opts: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shard the full tensors, run context_parallel_attention forward and backward, and put the output
    and gradients (query, key, value, and a tensor temperature's if it requires grad) together again."""
    shards = [shard_sequence(x, 2, layout=layout).requires_grad_(True) for x in (q, k, v)]
    names = ["query", "key", "value"]
    opts = dict(opts)
    t = opts.get("temperature")
    if isinstance(t, torch.Tensor):
        opts["temperature"] = shard_sequence(t.detach(), -1, layout=layout).requires_grad_(t.requires_grad)
        if t.requires_grad:
            shards.append(opts["temperature"])
            names.append("temperature")
    out = context_parallel_attention(*shards[:3], method=method, layout=layout, **opts)
    grads = torch.autograd.grad(out, shards, shard_sequence(dout, 2, layout=layout))
    full = {name: unshard_sequence(g, 2 if name != "temperature" else -1, layout=layout)
            for name, g in zip(names, grads)}
    return unshard_sequence(out, 2, layout=layout), full


def check_short(env: harness.Ranks, method: str, layout: str, opts: dict, n: int) -> Callable[[], str]:
    def run() -> str:
        q, k, v, dout = full_inputs(env, 1, 4, 2, n, 128, seed=1)
        run_opts = dict(opts, enable_gqa=True)
        if run_opts.pop("tensor_temperature", False):
            g = torch.Generator(device=env.device).manual_seed(2)
            t = torch.rand(1, 4, n, generator=g, device=env.device) * 3 - 1
            run_opts["temperature"] = t.requires_grad_(True)
        if run_opts.pop("kv_lengths", False):
            run_opts["kv_lengths"] = torch.tensor([n - n // 3 - 5], device=env.device)
        out, grads = ring_grads(q, k, v, dout, method, layout, run_opts)
        if env.rank == 0:
            t = run_opts.get("temperature")
            fwd = dict(run_opts, temperature=t.detach()) if isinstance(t, torch.Tensor) else run_opts
            assert_matches_reference(out, q, k, v, **fwd)
            assert_grads_match_reference(grads, q, k, v, dout, **run_opts)
        return ""
    return run


def check_long(env: harness.Ranks, n: int, heads: int) -> Callable[[], str]:
    def run() -> str:
        q, k, v, dout = full_inputs(env, 1, heads, heads, n, 128, seed=3)
        opts = {"is_causal": True, "temperature": "infoscale", "train_len": TRAIN_LEN}
        out, grads = ring_grads(q, k, v, dout, "ring", "zigzag", opts)
        if env.rank != 0:
            return ""
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        single = infoscale_triton.scaled_dot_product_attention(*leaves, **opts)
        single_grads = torch.autograd.grad(single, leaves, dout)
        g = torch.Generator().manual_seed(4)
        rows = torch.cat([torch.tensor([0, 1, n // 4 - 1, n // 4, n // 2 - 1, n // 2, n - 2, n - 1]),
                          torch.randint(0, n, (8,), generator=g)]).to(env.device)
        allowed = torch.arange(n, device=env.device)[None, :] <= rows[:, None]
        row_opts = {"attn_mask": allowed, "temperature": "infoscale", "train_len": TRAIN_LEN}
        assert_matches_reference(out[:, :, rows], q[:, :, rows], k, v, **row_opts)
        assert_grads_match_reference({"query": grads["query"][:, :, rows]}, q[:, :, rows], k, v,
                                     dout[:, :, rows], **row_opts)
        bound = 2.0**-7
        errors = {"out": rel_error(out, single.detach().double())}
        for name, g_single in zip(("key", "value"), single_grads[1:]):
            errors[name] = rel_error(grads[name], g_single.double())
            assert errors[name] <= bound, (f"d{name}: ||ring - single|| / ||single|| = {errors[name]:.3e} > "
                                           f"{bound:.3e}")
        return "ring vs single-GPU: " + ", ".join(f"{k} {e:.2e}" for k, e in errors.items())
    return run


def check_repeatable(env: harness.Ranks, n: int) -> Callable[[], str]:
    def run() -> str:
        q, k, v, dout = full_inputs(env, 1, 4, 4, n, 128, seed=5)
        opts = {"is_causal": True, "temperature": "infoscale", "train_len": TRAIN_LEN}
        shards = [shard_sequence(x, 2) for x in (q, k, v, dout)]
        results = []
        for _ in range(2):
            leaves = [s.detach().clone().requires_grad_(True) for s in shards[:3]]
            out = context_parallel_attention(*leaves, **opts)
            results.append([out.detach(), *torch.autograd.grad(out, leaves, shards[3])])
        same = torch.tensor([int(all(torch.equal(a, b) for a, b in zip(*results)))], device=env.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        assert same.item() == 1, "two runs on the same inputs gave different bits (out, dq, dk or dv)"
        return ""
    return run


# ---------------------------------------------------------------------------------------------------
# FSDP2 + context parallelism: a small transformer


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attend: Callable) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, dim // self.heads).unbind(2)
        q, k = (rotate(t, *rope).transpose(1, 2) for t in (q, k))
        # the kernels take bf16 / fp16; the model stays in float32 (FSDP2 shards float32 parameters)
        att = attend(q.to(DTYPE), k.to(DTYPE), v.transpose(1, 2).to(DTYPE)).float()
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


DTYPE = torch.bfloat16


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, L, H, D) at the rows' positions (cos, sin: (L, D/2))."""
    a, b = x.float().chunk(2, -1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat([a * c - b * s, a * s + b * c], -1).to(x.dtype)


class Model(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head_dim = dim // heads

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Callable) -> torch.Tensor:
        inv = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, device=tokens.device) / self.head_dim)
        angles = positions[:, None].float() * inv[None, :]
        rope = (angles.cos(), angles.sin())
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, rope, attend)
        return self.head(self.norm(x))


def bigram_tokens(n: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    """A sequence that mostly follows a fixed random successor per token (learnable), 10% noise."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randperm(vocab, generator=g)
    noise = torch.rand(n, generator=g) < 0.1
    rand = torch.randint(0, vocab, (n,), generator=g)
    tokens = torch.empty(n, dtype=torch.int64)
    tokens[0] = 0
    for i in range(1, n):  # (host loop: n is small)
        tokens[i] = rand[i] if noise[i] else succ[tokens[i - 1]]
    return tokens.to(device)


def check_training(env: harness.Ranks, n: int, steps: int) -> Callable[[], str]:
    def run() -> str:
        from torch.distributed.fsdp import fully_shard

        global DTYPE
        DTYPE = low_dtype()
        smoke = not harness.on_gpu()
        vocab, dim, heads, layers = 256, 256 if smoke else 512, 2 if smoke else 4, 2
        cp_group = dist.new_group(list(range(env.world)))  # its own communicator, apart from FSDP's
        torch.manual_seed(0)
        model = Model(vocab, dim, heads, layers).to(env.device)
        reference = Model(vocab, dim, heads, layers).to(env.device)
        reference.load_state_dict(model.state_dict())
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        tokens = bigram_tokens(n + 1, vocab, seed=6, device=env.device)
        positions = torch.arange(n, device=env.device)
        inputs, labels, pos = (shard_sequence(t, 0, cp_group) for t in (tokens[:-1], tokens[1:], positions))
        attn_opts = {"is_causal": True, "temperature": "infoscale", "train_len": 1024}

        def cp_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return context_parallel_attention(q, k, v, cp_group, **attn_opts)

        def one_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return infoscale_triton.scaled_dot_product_attention(q, k, v, **attn_opts)

        # step 0 on one device, no sharding: the reference loss and gradients
        ref_loss = F.cross_entropy(reference(tokens[:-1][None], positions, one_device)[0], tokens[1:])
        ref_loss.backward()
        losses = []
        for step in range(steps):
            logits = model(inputs[None], pos, cp_attend)[0]
            loss = F.cross_entropy(logits, labels)  # this rank's tokens; FSDP averages the gradients
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / env.world)
            if step == 0:
                grads = [p.grad.full_tensor() for p in model.parameters()]
                ref = torch.cat([p.grad.flatten() for p in reference.parameters()]).double()
                got = torch.cat([g.flatten() for g in grads]).double()
                grad_error = ((got - ref).norm() / ref.norm()).item()
            opt.step()
            opt.zero_grad()
        loss_error = abs(losses[0] - ref_loss.item()) / ref_loss.item()
        detail = (f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps; step 0 against one device: "
                  f"loss {ref_loss.item():.4f} (rel. {loss_error:.1e}), gradients rel. {grad_error:.1e}")
        # bf16 attention inside a float32 model: ~1e-2 of the gradients' size
        assert loss_error < 1e-2 and grad_error < 5e-2, detail
        head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert tail < 0.9 * head, f"the loss did not fall: {detail}"
        dist.destroy_process_group(cp_group)
        return detail
    return run


def run_checks(env: harness.Ranks, out: harness.ResultsFile, all_options: bool) -> bool:
    """Every check, in order of importance; the long ones while time is left (``env``'s deadline).
    Returns whether all passed."""
    smoke = not harness.on_gpu()  # the interpreter: small sizes
    short = 256 if smoke else 8192
    longs = [2 * short] if smoke else [65536, 131072, 262144]
    ok = True
    infoscale = {"is_causal": True, "temperature": "infoscale", "train_len": TRAIN_LEN}
    logn = {"temperature": "logn", "train_len": TRAIN_LEN}
    cases = [("ring", "zigzag", infoscale),
             ("ring", "contiguous", dict(logn, is_causal=True)),
             ("ring", "zigzag", {"is_causal": True, "tensor_temperature": True}),
             ("all_to_all", "zigzag", infoscale)]
    if all_options:
        cases += [("ring", "zigzag", dict(infoscale, cos_scale=32.0, kv_lengths=True)),
                  ("all_to_all", "contiguous", dict(logn, is_causal=False, cos_scale=32.0, kv_lengths=True))]
    for method, layout, opts in cases:
        label = ", ".join(f"{k}={v}" for k, v in opts.items() if k != "train_len")
        ok &= run_check(env, out, f"short {method} {layout} N={short} {label}",
                        check_short(env, method, layout, opts, short))
    repeat = short if smoke else 8 * short
    ok &= run_check(env, out, f"repeatable N={repeat}", check_repeatable(env, repeat))
    ok &= run_check(env, out, "FSDP2 + context parallel training",
                    check_training(env, 128 if smoke else 16384, 4 if smoke else 30))
    for n in longs:
        # ~2.5 s for the single-GPU reference at 256k with 4 heads, ~1.3 s for the ring, + the checks
        if not env.agree(env.left() > 30 + 20 * (n / 262144) ** 2):
            out.log(f"skip  long N={n}: out of time")
            out.add({"name": f"long N={n}", "status": "skipped (time)"})
            continue
        ok &= run_check(env, out, f"long ring zigzag causal infoscale N={n}",
                        check_long(env, n, 2 if smoke else 4))
    return ok
