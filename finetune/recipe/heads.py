"""The final hidden states and the output head of a causal LM, for losses that run the head themselves in chunks
(DPO's log-probabilities, distillation's KL): the model runs through its own forward, so a DistributedDataParallel
wrapper sees the pass and all-reduces the LoRA gradients, and keeps the logits of one position only."""
from __future__ import annotations


def output_head(model):
    """The output projection, through DDP and peft wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return inner.get_output_embeddings()


def final_hidden(model, batch: dict):
    """[rows, tokens, hidden]: the last layer's normed output for every position (labels are not passed: the
    caller's loss reads them)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]
