"""Builds the fused scan kernel for Hopper (sm_90) on a machine without a GPU and reports
its resource use as JSON: ``python tests/hopper_build.py paper:1 reference:8:0 …``
(variant:batch[:tma], tma 1 by default).

Run as its own process: the kernel tests set TRITON_INTERPRET=1, under which ``triton.jit``
makes interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quari.kernels import scan_triton as st

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def build(
    variant: str,
    batch: int,
    dim: int = 768,
    rank: int = 64,
    config: st.KernelConfig | None = None,
    tma: bool = True,
) -> dict:
    """Compiles one launch configuration (default: the default one, with or without TMA)
    for sm_90 and reads its resource use."""
    reference = variant == "reference"
    cfg = config or replace(st.default_config(batch, rank, reference, dim), tma=tma)
    cfg = st.resolve_config(cfg, _Shape(batch, rank, variant, dim))
    fn = st._fused_scan_kernel_tma if cfg.tma else st._fused_scan_kernel
    names = fn.arg_names
    cols = cfg.group * st.column_width(rank)
    constexprs = dict(
        DIM=dim, REFERENCE=reference, G=cfg.group, W=st.column_width(rank), NW=16,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, UPCAST=False, PERSISTENT=cfg.persistent,
    )  # fmt: skip
    if not cfg.tma:
        constexprs["EVEN_K"] = dim % cfg.block_k == 0
    descriptors = {
        "g_desc": f"tensordesc<bf16[{cfg.block_m}, {cfg.block_k}]>",
        "m_desc": f"tensordesc<bf16[{cfg.block_k}, {cols}]>",
        "a_desc": f"tensordesc<bf16[{cfg.block_k}, {cols}]>",
        "n_desc": f"tensordesc<bf16[{cfg.block_k}, 16]>",
    }
    ints = {"stride_g", "stride_s", "n_rows", "n_queries", "n_groups", "n_tiles"}
    signature = {}
    for n in names:
        if n in constexprs:
            signature[n] = "constexpr"
        elif n in descriptors:
            signature[n] = descriptors[n]
        elif n.endswith("_ptr"):
            signature[n] = "*fp32" if n in ("weights_ptr", "scores_ptr") else "*bf16"
        else:
            signature[n] = "i32" if n in ints else "fp32"
    # As the JIT specialises a real launch: 16-byte aligned pointers, a row stride of 768.
    aligned = [(names.index(n),) for n in names if n.endswith("_ptr") or n == "stride_g"]
    attrs = {key: [["tt.divisibility", 16]] for key in aligned}
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "scan.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = str(TOOLS / "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True)
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout)
    return {
        "config": cfg.describe(),
        "registers": int(m.group(1)) if m else None,
        "stack": int(m.group(2)) if m else None,
        "local": int(m.group(3)) if m else None,
        "shared": kernel.metadata.shared,
        "hgmma": sass.count("HGMMA"),
        "ldgsts": sass.count("LDGSTS"),
        "tma_loads": sass.count("UTMALDG"),
    }


class _Shape:
    """Just what resolve_config reads from a ScoringPlan."""

    def __init__(self, batch: int, rank: int, variant: str, dim: int) -> None:
        self.batch, self.rank, self.dim = batch, rank, dim
        self.reference = variant == "reference"


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    out = {}
    for arg in sys.argv[1:]:
        variant, batch, tma = [*arg.split(":"), "1"][:3]
        out[arg] = build(variant, int(batch), tma=tma == "1")
    print(json.dumps(out))
