"""Compile the attention kernels for the H100 (sm_90) on any machine, no GPU needed, and print what
ptxas reports per kernel: registers, spills, serialised wgmma (a tuning aid, not a timing).

Usage: python benchmarks/ptxas_report.py [--dropout] [--d 64 128] [--dtype bf16 fp16] [--lk 4096]
Uses the default launch configs (kernels/attention_fwd.py: fwd_config, attention_bwd.py: bwd_config),
causal InfoScale without attn_mask. Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from infoscale_triton.kernels.attention_bwd import (
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    bwd_config,
)
from infoscale_triton.kernels.attention_fwd import attention_fwd_kernel, fwd_config
from triton.backends.compiler import GPUTarget

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
FLOATS = {"scale_log2", "temp_a", "temp_b", "dropout_p", "dropout_scale", "scale"}
POINTERS = {"Count": "*i32", "Seed": "*i64", "Lse": "*fp32", "LogL": "*fp32", "Temp": "*fp32", "Mask": "*fp32",
            "Delta": "*fp32", "RowScale": "*fp32", "KInv": "*fp32", "DT": "*fp32", "CuQ": "*i32", "CuK": "*i32",
            "KvRange": "*i32", "Entropy": "*fp32", "MaxProb": "*fp32"}


def arg_type(name: str, dtype: str) -> str:
    """The kernels' argument types: inputs/outputs in ``dtype``, float32 row data, int32 sizes/strides."""
    if name in FLOATS:
        return "fp32"
    if name in POINTERS:
        return POINTERS[name]
    if name in ("Q", "K", "V", "Out", "DOut", "DK", "DV", "DQ"):
        return f"*{dtype}"
    return "i32"


def report(label: str, fn, dtype: str, constexprs: dict, cfg: dict) -> None:
    cfg = dict(cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = {**constexprs, **cfg}
    signature = {n: "constexpr" if n in constexprs else arg_type(n, dtype) for n in fn.arg_names}
    # as a launch specialises them: 16-byte aligned pointers, strides multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(signature.items())
             if t.startswith("*") or n.startswith("stride")}
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    facts = [line.split("ptxas info    :")[-1].strip() for line in out.splitlines()
             if "registers" in line or "spill" in line]
    facts += ["wgmma serialised"] if "C7515" in out else []
    shape = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N"))
    print(f"{label} {shape} w{warps} s{stages}: " + "; ".join(facts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dropout", action="store_true")
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", nargs="+", default=["bf16"])
    ap.add_argument("--lk", type=int, default=4096)
    args = ap.parse_args()
    for dtype in args.dtype:
        elsize = 4 if dtype == "fp32" else 2
        for d in args.d:
            block = max(triton.next_power_of_2(d), 16)
            common = dict(HEAD_D=d, HEAD_DV=d, BLOCK_D=block, BLOCK_DV=block, IS_CAUSAL=True, COS=False,
                          MASK_MODE=0, DOT_PREC="ieee" if dtype == "fp32" else "tf32", DROPOUT=args.dropout,
                          VARLEN=False, HAS_KV_RANGE=False, WINDOW=False)
            tag = f"{dtype} D={d}{' dropout' if args.dropout else ''}"
            fwd = fwd_config(block, block, args.lk, elsize, False, dropout=args.dropout)
            report(f"fwd  {tag}", attention_fwd_kernel, dtype,
                   dict(common, TEMP_MODE=1, CLIP=False, HAS_COUNT=False, SIGNED=False, ENTROPY=False), fwd)
            dkdv, dq = bwd_config(block, block, elsize, False)
            report(f"dkdv {tag}", attention_bwd_dkdv_kernel, dtype, common, dkdv)
            report(f"dq   {tag}", attention_bwd_dq_kernel, dtype, dict(common, TEMP_GRAD=False), dq)


if __name__ == "__main__":
    main()
