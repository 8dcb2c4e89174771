"""The kernels compile for a Hopper GPU (sm_90) through Triton's full pipeline, PTX and ptxas
included, without a GPU: the interpreter used by the other tests accepts code the compiler
rejects (a global read from a kernel, a value whose type changes across a branch)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from kernel_cases import TRITON_MISSING

pytest.importorskip("triton", reason=TRITON_MISSING)

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from specsample.kernels import chain, tree

    def compile_for_hopper(fn, types, constexprs):
        signature = {
            name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names
        }
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        options = {"num_warps": chain.NUM_WARPS, "enable_fp_fusion": False}
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["cubin"], fn.__name__

    chain_types = dict(
        tokens_ptr="*i64", lengths_ptr="*i64", accept_ptr="*fp64", sample_ptr="*fp64",
        out_tokens_ptr="*i64", out_accepted_ptr="*i64", k="i32", vocab="i32",
    )
    tree_types = dict(
        tokens_ptr="*i64", parents_ptr="*i64", valid_ptr="*i8", accept_ptr="*fp64",
        sample_ptr="*fp64", ws_ptr="*fp64", out_tokens_ptr="*i64", out_accepted_ptr="*i64",
        out_path_ptr="*i64", n="i32", depth="i32", vocab="i32",
    )
    block = dict(BLOCK=chain.BLOCK_CUDA)
    for probs, dense in [("*fp32", True), ("*bf16", False)]:
        types = dict(chain_types, draft_ptr=probs, target_ptr=probs)
        compile_for_hopper(chain._token_kernel, types, dict(block, DENSE=dense, SLOTS=8))
        tree_case = dict(tree_types, draft_ptr=probs, target_ptr=probs)
        compile_for_hopper(tree._tree_kernel, tree_case, dict(block, DENSE=dense, SLOTS=4))
    compile_for_hopper(
        chain._block_kernel, dict(chain_types, draft_ptr="*fp16", target_ptr="*fp16"),
        dict(block, SLOTS=16),
    )
    print("compiled")
    """
)


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
