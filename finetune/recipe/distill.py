"""Knowledge distillation: the LoRA student learns the teacher's token distribution on the trained tokens.

loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T), summed over the label tokens of a step
and normalised by their count. Both models run once through their own forward (DDP sees the student's), keeping
their final hidden states; the output heads run on chunks of distill.chunk_size trained tokens inside activation
checkpoints, so at most one chunk of either model's [tokens x vocab] logits exists at a time, in forward and in
backward.

With distill.seq_kd the teacher first writes the training answers (greedy), and the student trains on those.
The teacher must share the student's tokenizer: the two distributions are compared token id by token id.
"""
from __future__ import annotations

import logging

from finetune.recipe.checkpoints import TrainError
from finetune.recipe.heads import final_hidden, output_head
from finetune.recipe.references import resolve_teacher
from finetune.recipe.sft import SFTRecipe

log = logging.getLogger("finetune.train")
FIELD = "distill.teacher_model_name_or_path"


def chunk_losses(s_head, t_head, s_hidden, t_hidden, targets, vocab: int, temperature: float):
    """[summed CE, summed KL] of one chunk of trained positions (the logits live only inside this call)."""
    import torch
    import torch.nn.functional as F

    s_logits = s_head(s_hidden).float()[:, :vocab]
    with torch.no_grad():
        t_logits = t_head(t_hidden).float()[:, :vocab]
        t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    ce = F.cross_entropy(s_logits, targets, reduction="sum")
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    return torch.stack([ce, kl])


def distill_sums(student, teacher, batch: dict, vocab: int, temperature: float, chunk_size: int):
    """[CE sum, KL sum] over the batch's label tokens."""
    import torch
    from torch.utils.checkpoint import checkpoint

    s_head, t_head = output_head(student), output_head(teacher)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    s_hidden = final_hidden(student, batch)[:, :-1][mask]
    with torch.no_grad():
        t_hidden = final_hidden(teacher, batch)[:, :-1][mask]
    targets = labels[mask]
    total = s_hidden.new_zeros(2, dtype=torch.float32)
    for i in range(0, targets.numel(), chunk_size):
        part = slice(i, i + chunk_size)
        total = total + checkpoint(chunk_losses, s_head, t_head, s_hidden[part], t_hidden[part], targets[part],
                                   vocab, temperature, use_reentrant=False)
    return total


def same_vocabulary(student_tok, teacher_tok) -> str | None:
    """None when both tokenizers map every token to the same id; else what differs."""
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a == b:
        return None
    differ = sum(1 for t, i in a.items() if b.get(t) != i) + sum(1 for t in b if t not in a)
    return f"{len(a)} vs {len(b)} tokens, {differ} of them missing or with different ids"


class DistillRecipe(SFTRecipe):
    """A LoRA student distilled from a teacher model (or a base + adapter from the store)."""

    def _setup_data(self) -> None:
        self._load_teacher()
        if not self.config.distill.seq_kd:
            return super()._setup_data()
        from finetune import data as D

        prepared = D.prepare(self.config.data, self.tokenizer, rewrite=self._teacher_answers)
        if not prepared.train:
            raise TrainError(f"data.path {self.config.data.path!r}: no training examples left after preparation")
        self.train_examples, self.validation_examples, self.data_stats = prepared.train, prepared.validation, prepared.stats
        self.data_stats["answers"] = "written by the teacher (seq_kd)"

    def _load_teacher(self) -> None:
        """The teacher, frozen, after checking that it shares the student's tokenizer (before any training)."""
        from finetune import model as M

        self.teacher_ref = ref = resolve_teacher(self.config)
        self.status.update(phase="loading_teacher")
        differs = same_vocabulary(self.tokenizer, M.load_tokenizer(ref.model))
        if differs:
            raise TrainError(f"{FIELD} {ref.spec!r}: its tokenizer differs from the student's "
                             f"(model.name_or_path {self.config.model.name_or_path!r}): {differs}. Distillation "
                             "compares the two models token by token, so they must share one tokenizer.")
        teacher = M.load_model(ref.model, for_training=False)
        if ref.adapter is not None:
            teacher = M.load_adapter(teacher, ref.adapter, is_trainable=False)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        self.vocab = len(self.tokenizer)
        self._window = {"ce": 0.0, "kl": 0.0, "tokens": 0}
        self.last_metrics: dict = {}
        log.info("teacher %s loaded (%s)", ref.spec, ref.model.quantization)

    def _teacher_answers(self, rows: list[list[dict]]) -> list[list[dict]]:
        """Each row's last answer replaced by the teacher's greedy answer to the turns before it."""
        from finetune.evaluation import generate as G

        dc, out = self.config.distill, []
        last = [max(i for i, m in enumerate(r) if m["role"] == "assistant") for r in rows]
        prompts = [r[:i] for r, i in zip(rows, last)]
        loaded = G.LoadedModel(key=("teacher", dc.teacher_quantization), model=self.teacher,
                               tokenizer=self.tokenizer, model_cfg=self.teacher_ref.model)
        self.status.update(phase="teacher_writing_answers")
        answers: list[str] = []
        with G.lock():
            for i in range(0, len(prompts), 8):
                texts, _ = G.locked_generate_batch(loaded, "teacher", prompts[i:i + 8], dc.max_new_tokens)
                answers += texts
        for row, i, answer in zip(rows, last, answers):
            out.append(row[:i] + [{"role": "assistant", "content": answer.strip() or row[i]["content"]}] + row[i + 1:])
        log.info("seq_kd: the teacher wrote %d answers", len(out))
        return out

    def loss_step(self, batch: dict, num_items_in_batch: int):
        dc = self.config.distill
        ce, kl = distill_sums(self.model, self.teacher, batch, self.vocab, dc.temperature, dc.chunk_size)
        if self.model.training:
            self._window["ce"] += float(ce.detach())
            self._window["kl"] += float(kl.detach())
            self._window["tokens"] += int((batch["labels"][:, 1:] != -100).sum())
        return (dc.alpha * ce + (1 - dc.alpha) * dc.temperature ** 2 * kl) / num_items_in_batch

    def step_metrics(self) -> dict:
        n = max(1, self._window["tokens"])
        out = {"distill/ce": round(self._window["ce"] / n, 6), "distill/kl": round(self._window["kl"] / n, 6)}
        self._window = {"ce": 0.0, "kl": 0.0, "tokens": 0}
        self.last_metrics = out
        return out

    def objective_record(self) -> dict:
        dc = self.config.distill
        return {"objective": "distill", "teacher": self.teacher_ref.record(),
                "distill": {"alpha": dc.alpha, "temperature": dc.temperature, "seq_kd": dc.seq_kd,
                            "final": self.last_metrics}}

    def evaluate_adapter(self, meta: dict) -> None:
        self.teacher = None  # the evaluator loads the models it compares itself
        super().evaluate_adapter(meta)
        if self.main and self.config.evaluation.enabled:
            from finetune.evaluation.distill_eval import record_comparison

            record_comparison(self.config, meta)
