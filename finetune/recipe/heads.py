"""The final hidden states and the output head of a causal LM, for losses that run the head themselves in chunks
(DPO's log-probabilities, distillation's KL): the model runs through its own forward, so a DistributedDataParallel
wrapper sees the pass and all-reduces the LoRA gradients, and keeps the logits of one position only."""
from __future__ import annotations


def _causal_lm(model):
    from finetune.recipe.speed import inner_model

    return inner_model(getattr(model, "module", model))  # DistributedDataParallel, then peft


def output_head(model):
    """The output projection, through DDP and peft wrappers."""
    return _causal_lm(model).get_output_embeddings()


def final_hidden(model, batch: dict):
    """[rows, tokens, hidden]: the decoder's last (normed) output at every position, taken by a hook on the decoder
    (output_hidden_states would also keep every layer's output alive until the forward ends, which defeats the
    offload of checkpointed layer inputs). Labels are not passed: the caller's loss reads them."""
    seen: list = []

    def keep(module, args, out):
        seen.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    handle = _causal_lm(model).get_decoder().register_forward_hook(keep)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return seen[-1]
