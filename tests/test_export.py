"""Export with the real SmolLM2 and a real QLoRA adapter: the merged folder against peft, the GGUF files read back by
transformers, the Ollama template rendered by Go's text/template against the tokenizer's chat template, refusals."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import train_qlora_adapter
from finetune.export import ExportError, exports_dir, list_exports, run_export
from finetune.export.gguf_model import GGUFExportError, write_gguf
from finetune.export.modelfile import PROBES
from finetune.paths import adapters_dir

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is 12 plus 30?", "What is 7 plus 5?", "Name three colours."]
NEW_TOKENS = 16
# Stated tolerances (measured on this adapter: see docs/export.md for the numbers).
MERGED_LOGIT_TOL = 1.0     # bf16-rounded merged weights vs peft base(float32) + adapter, max abs over all positions
F16_LOGIT_TOL = 1e-3       # bf16 -> f16 is exact for these weights; allow float noise
Q8_MEAN_ABS_TOL = 0.3      # q8_0: mean abs logit difference vs the merged model (worst prompt)
Q8_ARGMAX_AGREE = 0.95     # q8_0: share of positions whose top token is unchanged


@pytest.fixture(scope="module")
def adapter(chat_jsonl) -> str:
    return train_qlora_adapter(chat_jsonl)


@pytest.fixture(scope="module")
def hf_export(adapter) -> dict:
    return run_export(adapter, "hf")


@pytest.fixture(scope="module")
def gguf_f16(adapter) -> dict:
    return run_export(adapter, "gguf", "f16")


@pytest.fixture(scope="module")
def gguf_q8_cli(adapter) -> dict:
    """The q8_0 export through the CLI, as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "finetune", "export", adapter, "--format", "gguf", "--quant", "q8_0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _tokenizer():
    from transformers import AutoTokenizer

    from finetune.model import prepare_default

    return AutoTokenizer.from_pretrained(prepare_default())


def _ids(tok, prompt: str):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def _run(model, tok) -> tuple[list, list]:
    """(greedy continuations, logits) on PROMPTS."""
    gens, logits = [], []
    with torch.no_grad():
        for p in PROMPTS:
            ids = _ids(tok, p)
            logits.append(model(ids).logits.float())
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
            gens.append(tok.decode(out[0, ids.shape[1]:]))
    return gens, logits


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def merged_run(hf_export):
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    merged = AutoModelForCausalLM.from_pretrained(hf_export["path"], dtype=torch.float32).eval()
    return _run(merged, tok)


def _load_gguf(manifest: dict):
    from transformers import AutoModelForCausalLM

    name = next(Path(f["path"]).name for f in manifest["files"] if f["path"].endswith(".gguf"))
    folder = manifest["path"]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval(), Path(folder) / name


def test_merged_folder_matches_peft_base_plus_adapter(adapter, hf_export, merged_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.model import prepare_default

    tok = _tokenizer()
    base = AutoModelForCausalLM.from_pretrained(prepare_default(), dtype=torch.float32).eval()
    base_gens, _ = _run(base, tok)
    peft_gens, peft_logits = _run(PeftModel.from_pretrained(base, str(adapters_dir() / adapter)).eval(), tok)
    merged_gens, merged_logits = merged_run
    assert peft_gens != base_gens, "the adapter should change the answers (learning rate too low?)"
    assert merged_gens == peft_gens
    assert _max_diff(merged_logits, peft_logits) <= MERGED_LOGIT_TOL
    folder = Path(hf_export["path"])
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen_cfg["eos_token_id"]
    assert sorted(folder.glob("model*.safetensors")) and (folder / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).chat_template == tok.chat_template
    card = (folder / "README.md").read_text()
    assert "4bit" in card and "never into quantized weights" in card and adapter in card
    assert hf_export["merge"]["max_abs_logit_diff_vs_peft"] <= MERGED_LOGIT_TOL


def test_manifest_lists_every_file_with_size_and_sha256(hf_export):
    from finetune.fsutil import sha256_file

    folder = Path(hf_export["path"])
    listed = {f["path"]: f for f in hf_export["files"]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    for rel, f in listed.items():
        assert f["bytes"] == (folder / rel).stat().st_size and f["sha256"] == sha256_file(folder / rel)
    assert any(r["path"] == str(folder) for r in list_exports(hf_export["adapter"]))
    assert not list(exports_dir().glob(".tmp-*")), "no staging folder stays behind"


def test_gguf_f16_reads_back_in_transformers_with_the_same_answers(gguf_f16, merged_run):
    model, path = _load_gguf(gguf_f16)
    gens, logits = _run(model, _tokenizer())
    assert gens == merged_run[0]
    assert _max_diff(logits, merged_run[1]) <= F16_LOGIT_TOL
    assert path.stat().st_size > 200 * 2**20  # 135M parameters in f16


def test_gguf_q8_0_from_the_cli_stays_within_tolerance(gguf_q8_cli, merged_run):
    assert gguf_q8_cli["format"] == "gguf" and gguf_q8_cli["quant"] == "q8_0"
    assert all(Path(f["path"]).is_file() for f in gguf_q8_cli["files"])
    model, path = _load_gguf(gguf_q8_cli)
    _, logits = _run(model, _tokenizer())
    ref = merged_run[1]
    mean_abs = max(float((x - y).abs().mean()) for x, y in zip(logits, ref))
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(logits, ref)) / sum(x.shape[1] for x in ref)
    assert mean_abs <= Q8_MEAN_ABS_TOL and agree >= Q8_ARGMAX_AGREE, (mean_abs, agree)
    assert path.stat().st_size < 160 * 2**20


def test_gguf_metadata_carries_tokenizer_template_and_end_of_turn(gguf_f16):
    import gguf

    _, path = _load_gguf(gguf_f16)
    fields = gguf.GGUFReader(str(path)).fields
    value = lambda k: fields[k].contents()  # noqa: E731
    tok = _tokenizer()
    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "smollm"
    assert value("tokenizer.chat_template") == tok.chat_template
    assert value("tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert len(value("tokenizer.ggml.tokens")) == 49152


def _go_render(template: str, messages: list[dict]) -> str:
    out = subprocess.run(["go", "run", str(ROOT / "tests" / "gotemplate" / "render.go")], capture_output=True,
                         text=True, input=json.dumps({"template": template, "messages": messages}), timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt-get install golang-go) to run text/template")
def test_modelfile_template_renders_like_the_chat_template(gguf_f16):
    folder = Path(gguf_f16["path"])
    text = (folder / "Modelfile").read_text()
    gguf_name = next(f["path"] for f in gguf_f16["files"] if f["path"].endswith(".gguf"))
    assert f"FROM ./{gguf_name}" in text and 'PARAMETER stop "<|im_end|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    tok = _tokenizer()
    for messages in PROBES:
        assert _go_render(template, messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)


def test_unknown_format_quant_and_names_are_refused(adapter):
    with pytest.raises(ExportError, match="format 'onnx' is not one of"):
        run_export(adapter, "onnx")
    with pytest.raises(ExportError, match="quant 'q3_k' is not available for format gguf"):
        run_export(adapter, "gguf", "q3_k")
    with pytest.raises(ExportError, match="adapter"):
        run_export("../etc", "hf")
    with pytest.raises(FileNotFoundError):
        run_export("no-such-adapter", "hf")


def test_an_architecture_other_than_llama_or_qwen2_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(GGUFExportError, match="this model is GPT2LMHeadModel"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "f16", "x")
    assert not (tmp_path / "x.gguf").exists()


def test_a_full_disk_is_refused_up_front_with_the_numbers(adapter):
    free = shutil.disk_usage(exports_dir()).free
    before = {p.name for p in exports_dir().rglob("*")}
    with pytest.raises(ExportError, match=r"not enough free disk.*needs about \d+ MiB.*MiB free"):
        run_export(adapter, "gguf", "q4_0", reserve_bytes=free)
    assert {p.name for p in exports_dir().rglob("*")} == before


def test_the_playground_can_chat_with_a_merged_export(hf_export):
    from app.playground_tab import resolve_target, target_choices
    from finetune.evaluation import generate as G

    value = f"export:{hf_export['adapter']}/bf16"
    assert value in [v for _, v in target_choices()]
    adapter, kw = resolve_target(value)
    assert adapter is None and kw["base"] == hf_export["path"]
    assert G.generate(adapter, PROMPTS[0], max_new_tokens=8, **kw).strip()
    with pytest.raises(ExportError):
        resolve_target("export:../../etc/bf16")
