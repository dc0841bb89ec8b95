"""One error base and one way to say what went wrong in plain words.

Every error the studio raises on purpose (a bad config field, bad data, an unknown job, an adapter that is not in the
store ...) derives from StudioError and carries a sentence meant for the person who caused it. plain_message turns any
exception into such a sentence; the training process, the job store's failure diagnosis and the UI all use it."""
from __future__ import annotations

import errno

OOM_ADVICE = ("ran out of memory: lower training.per_device_train_batch_size or data.max_seq_length, keep "
              "training.gradient_checkpointing on, or load the model in 4-bit (model.quantization=4bit); "
              "when generating, ask for fewer max_new_tokens")


class StudioError(ValueError):
    """An error whose message is already a plain sentence naming the field, file or job at fault."""


class JobError(StudioError):
    """An operation that does not apply to the job (cancel a completed job, resume a running one, unknown id)."""


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError is a RuntimeError; checked by name so that callers need not import torch.
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def oom_message(text: str = "") -> str:
    """The one out-of-memory sentence; `text` (the error) tells whether it was the GPU."""
    return f"the {'GPU' if 'cuda' in text.lower() else 'device'} {OOM_ADVICE}"


def missing_module_message(module: str) -> str:
    if module.split(".")[0] == "finetune":
        return f"the studio's own module {module} is missing: the checkout is incomplete (git status, make setup)"
    return f"a Python package is missing: {module} (install it into the studio's environment: pip install {module.split('.')[0]})"


def disk_full_message(where: str | None = None) -> str:
    return (f"disk full: no space left on device{f' writing {where}' if where else ''}; free some space, then "
            "resume the job (it continues from its last checkpoint)")


def expected(exc: BaseException) -> bool:
    """Whether plain_message has a sentence for it (else it is a bug worth a traceback in the log)."""
    return isinstance(exc, (StudioError, ImportError, KeyboardInterrupt, FileNotFoundError, KeyError, ValueError,
                            TimeoutError)) or is_out_of_memory(exc) or _disk_full(exc)


def _disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def plain_message(exc: BaseException) -> str:
    """One sentence a person can act on."""
    if isinstance(exc, StudioError):
        return str(exc) or type(exc).__name__
    if is_out_of_memory(exc):
        return oom_message(str(exc))
    if isinstance(exc, ImportError):
        missing = getattr(exc, "name", None)
        return missing_module_message(missing) if missing else f"a Python package is missing: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGINT)"
    if _disk_full(exc):
        return disk_full_message(getattr(exc, "filename", None))
    if isinstance(exc, KeyError):
        return str(exc).strip("'\"") or "KeyError"
    if isinstance(exc, (FileNotFoundError, ValueError, TimeoutError)):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"
