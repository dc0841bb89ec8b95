"""PEFT Studio web UI (Gradio). Never imports torch at import time; see app/main.py."""
