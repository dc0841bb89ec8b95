"""The adapter store: publish atomically, list, show, export, delete and import adapters, and find an adapter's base.
Torch-free: the UI lists and manages adapters through these names."""
from finetune.store.adapters import (META, WEIGHTS, AdapterError, adapter_path, delete_adapter, export_zip,
                                     get_adapter, list_adapters, publish, resolve_base, staging_dir, update_metadata)
from finetune.store.zip_import import ZipImportError, import_zip

__all__ = ["META", "WEIGHTS", "AdapterError", "ZipImportError", "adapter_path", "delete_adapter", "export_zip",
           "get_adapter", "import_zip", "list_adapters", "publish", "resolve_base", "staging_dir", "update_metadata"]
