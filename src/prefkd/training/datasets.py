"""The training data of a composed config: instruction records → ``DistillDataset``, preference pairs →
``PreferenceDataset``, tokenised for the student and (when the loss runs one) the teacher."""

from __future__ import annotations

from omegaconf import DictConfig


def check_kind(cfg: DictConfig, loss) -> None:
    """The dataset gives what the loss trains on: preference pairs (``dataset.kind: preference``) or instruction
    records."""
    preference = cfg.dataset.get("kind", "instruct") == "preference"
    if preference != loss.needs.pairs:
        raise ValueError(f"loss {cfg.loss._target_} trains on "
                         f"{'preference pairs' if loss.needs.pairs else 'instruction records'} but dataset "
                         f"{cfg.dataset.source._target_} holds {'pairs' if preference else 'instruction records'}: "
                         + ("pick a preference dataset (dataset=hh, or any config with `kind: preference`)"
                            if loss.needs.pairs else "pick an instruction dataset (dataset=hh_sft for the chosen "
                                                     "responses of pairs)"))


def check_data(cfg: DictConfig, splits, loss, processes: int) -> None:
    """Before any model loads: the records fit the loss (:func:`check_kind`), and the training split holds at least
    one optimizer step (``trainer.batch_size`` × processes × ``trainer.gradient_accumulation_steps`` records)."""
    check_kind(cfg, loss)
    t = cfg.trainer
    step = t.batch_size * processes * t.gradient_accumulation_steps
    if len(splits.train) < step:
        n = len(splits.train)
        raise ValueError(f"dataset {splits.source}: the training split holds {n} record{'s' * (n != 1)}, "
                         f"fewer than one optimizer step's {step} (trainer.batch_size={t.batch_size} × {processes} "
                         f"process(es) × trainer.gradient_accumulation_steps={t.gradient_accumulation_steps}): give "
                         f"more training records or lower trainer.batch_size")


def build_datasets(cfg: DictConfig, splits, student, teacher, loss):
    """Instruction data → DistillDataset (docs/methods.md §1); ``dataset.kind: preference`` → PreferenceDataset
    (docs/methods.md §10, parents with the teacher's tokenizer when the loss runs the teacher)."""
    from prefkd.data.dataset import DistillDataset

    check_kind(cfg, loss)
    preference = loss.needs.pairs
    if preference:
        from prefkd.data.preference import to_pairs
        from prefkd.data.preference_dataset import PreferenceDataset

        t_tok = teacher.tokenizer if teacher is not None and loss.needs.teacher else None
        common = dict(student_tokenizer=student.tokenizer, teacher_tokenizer=t_tok,
                      max_length=cfg.dataset.max_length, max_prompt_length=cfg.dataset.max_prompt_length,
                      eos_parent=cfg.dataset.get("eos_parent", True))
        train = PreferenceDataset(to_pairs(splits.train, f"{splits.source}:train"), **common,
                                  source=f"{splits.source}:train")
        dev = (PreferenceDataset(to_pairs(splits.dev, f"{splits.source}:dev"), **common, source=f"{splits.source}:dev")
               if splits.dev else None)
        return train, dev

    common = dict(student_tokenizer=student.tokenizer, teacher_tokenizer=teacher.tokenizer if teacher else None,
                  max_prompt_length=cfg.dataset.max_prompt_length, max_length=cfg.dataset.max_length,
                  precompute=loss.precompute, precompute_version=loss.precompute_version)
    train = DistillDataset(splits.train, source=f"{splits.source}:train", **common)
    dev = DistillDataset(splits.dev, source=f"{splits.source}:dev", **common) if splits.dev else None
    return train, dev
