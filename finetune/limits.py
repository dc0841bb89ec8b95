"""Every size limit the studio enforces, in one place (docs/security.md lists them).

They bound what one request, one data row or one imported file can make the studio hold in memory or keep the model
busy for; each is far above what a legitimate job, prompt or adapter needs.
"""
from __future__ import annotations

# --- job configs ---------------------------------------------------------------------------------------------------
MAX_CONFIG_BYTES = 256 * 1024        # a job YAML (a complete one is ~2 KB)
MAX_CONFIG_STRING = 16 * 1024        # any one string field of a job config (paths, names, system prompt)
MAX_CONFIG_LIST = 256                # any one list field (lora.target_modules)

# --- data files ----------------------------------------------------------------------------------------------------
MAX_DATA_LINE_CHARS = 4_000_000     # one JSONL line, checked before it is parsed
MAX_DATA_FIELD_CHARS = 1_000_000     # one string field of a row (a 131072-token sequence is ~500k characters)

# --- model work: the playground, /generate and /evaluate ------------------------------------------------------------
MAX_PROMPT_CHARS = 32_000            # one prompt (or the whole conversation sent with it)
MAX_NEW_TOKENS = 4096                # one generation
MAX_EVAL_NEW_TOKENS = 1024           # per answer in an evaluation
MAX_EVAL_EXAMPLES = 1000             # answers generated (twice: base and adapter) in one evaluation

# --- adapter zips ----------------------------------------------------------------------------------------------------
MAX_ZIP_MEMBERS = 64
MAX_ZIP_TOTAL_BYTES = 4 * 2**30      # a rank-256 adapter of a 70B model is a few GB
MAX_ZIP_SMALL_FILE_BYTES = 64 * 2**20  # every kept file except the weights (configs, tokenizer, model card)
MAX_ZIP_RATIO = 200                  # safetensors of random-ish floats compress ~1.1x, JSON ~5x: 200x is a bomb


def check_range(field: str, value, low: int, high: int) -> int:
    """An integer request parameter within [low, high], or a ValueError naming the field and the bounds."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a whole number between {low} and {high}, got {value!r}") from None
    if not low <= n <= high:
        raise ValueError(f"{field} must be between {low} and {high}, got {n}")
    return n


def check_text(field: str, text: str, limit: int = MAX_PROMPT_CHARS) -> str:
    if len(text) > limit:
        raise ValueError(f"{field} is {len(text)} characters long; the limit is {limit}")
    return text
