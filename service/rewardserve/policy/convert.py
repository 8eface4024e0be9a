"""GGUF -> a plain Hugging Face folder, once, so every backend (vLLM included) loads it fast.

transformers reads GGUF only by dequantizing it at every load (about 20 s for SmolLM2-135M
here); the converted folder holds float32 safetensors, the tokenizer and its chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def convert_gguf(folder: Path, gguf_file: str, output: Path) -> Path:
    if not (folder / gguf_file).is_file():
        raise FileNotFoundError(f"no GGUF file {folder / gguf_file}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are dequantized already: drop the quantizer so they save as plain floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "conversion.json").write_text(
        json.dumps({"from": str(folder / gguf_file), "dtype": str(model.dtype)}, indent=2)
    )
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)  # a crash mid-write never leaves a half folder under the real name
    return output
