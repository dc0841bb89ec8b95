"""Export an adapter as something that runs without the studio: a merged Hugging Face folder, or a GGUF file (with
an Ollama Modelfile) for llama.cpp and Ollama. Published atomically under exports_dir()/<adapter>/<format>-<quant>/.

CLI: python -m finetune export NAME --format hf|gguf [--quant ...]
"""
from finetune.export.exporter import check_free_space, required_bytes, run_export
from finetune.export.store import (DEFAULT_QUANT, FORMATS, ExportError, export_file, export_path, exports_dir,
                                   list_exports)

__all__ = ["DEFAULT_QUANT", "FORMATS", "ExportError", "check_free_space", "export_file", "export_path", "exports_dir",
           "list_exports", "required_bytes", "run_export"]
