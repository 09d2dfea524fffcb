"""Builds the fused scan kernel for Hopper (sm_90) on a machine without a GPU and reports
its resource use as JSON: ``python tests/hopper_build.py paper:1 reference:8 …``.

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
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quari.kernels import scan_triton as st

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def build(
    variant: str, batch: int, dim: int = 768, rank: int = 64, config: st.KernelConfig | None = None
) -> dict:
    """Compiles one launch configuration for sm_90 and reads its resource use."""
    reference = variant == "reference"
    cfg = config or st.default_config(batch, rank, reference, dim)
    cfg = st.resolve_config(cfg, _Shape(batch, rank, variant, dim))
    fn = st._fused_scan_kernel
    names = fn.arg_names
    constexprs = dict(
        DIM=dim, REFERENCE=reference, G=cfg.group, W=st.column_width(rank), NW=16,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, EVEN_K=dim % cfg.block_k == 0, UPCAST=False,
        PERSISTENT=cfg.persistent,
    )  # fmt: skip
    ints = {"stride_g", "stride_s", "n_rows", "n_queries", "n_groups", "n_tiles"}
    signature = {}
    for n in names:
        if n in constexprs:
            signature[n] = "constexpr"
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
    }


class _Shape:
    """Just what resolve_config reads from an Adaptation."""

    def __init__(self, batch: int, rank: int, variant: str, dim: int) -> None:
        self.rank, self.variant, self.embedding_dim, self._batch = rank, variant, dim, batch

    def __len__(self) -> int:
        return self._batch


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    out = {}
    for arg in sys.argv[1:]:
        variant, batch = arg.split(":")
        out[arg] = build(variant, int(batch))
    print(json.dumps(out))
