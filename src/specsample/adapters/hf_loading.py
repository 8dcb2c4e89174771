"""Loading with transformers: tokenizers, causal LMs and the conversion of a GGUF file into a
plain checkpoint. With hf.py (the `LanguageModel` adapter), this is the only place the library
calls transformers' loading API, so a change of that API between versions is handled here.

Version notes: `from_pretrained(dtype=)` needs transformers >= 4.56 (`torch_dtype` before);
`load_gguf_checkpoint(torch_dtype=)` needs >= 5.6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_tokenizer(folder: str, gguf_file: str | None = None) -> Any:
    """The tokenizer of a hub id or folder, or of the GGUF file `gguf_file` inside `folder`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def load_causal_lm(folder: str | Path, dtype: torch.dtype, device: str | torch.device) -> Any:
    """A transformers causal LM from a checkpoint folder, in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def gguf_to_checkpoint(gguf_path: Path, dtype: torch.dtype, out: Path) -> list[str]:
    """Write a plain transformers checkpoint (config, safetensors, tokenizer) of a GGUF file into
    the folder `out`. Returns the names of the model's tensors the file lacks (the first five,
    sorted); nothing is written then.

    Why not `from_pretrained(gguf_file=...)`: in transformers 5 that path requires `accelerate`.
    The same loader it uses (`load_gguf_checkpoint`) is called here directly, with a weightless
    (meta) model only to map the tensor names, so peak memory is the dequantized state dict in
    `dtype` plus one float32 tensor at a time.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, config=config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = set(skeleton.state_dict())
    if config.tie_word_embeddings:  # then the file has no output.weight (ours have one)
        expected.discard("lm_head.weight")
    parsed = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=dtype
    )
    tensors: dict[str, torch.Tensor] = parsed.pop("tensors")
    del parsed, skeleton
    if missing := expected - set(tensors):
        return sorted(missing)[:5]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config.dtype = dtype
    config.save_pretrained(out)
    tok.save_pretrained(out)
    return []
