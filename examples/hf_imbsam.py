"""ImbSAM in the Hugging Face Trainer: a 2-layer BERT built from a config (no download) on
synthetic long-tailed token sequences, a few steps on the CPU (about ten seconds). The one
imbsam line is the Trainer class; the tail classes come from the training labels.

    python examples/hf_imbsam.py [--steps 10]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import imbsam
from imbsam.integrations.hf import SharpnessTrainer

CLASSES, VOCAB, LENGTH = 4, 64, 12


def long_tailed_sequences(seed: int = 0) -> list[dict]:
    """Random tokens, with one class-marking token; 60, 24, 2 and 2 samples per class."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for label, n in enumerate([60, 24, 2, 2]):
        for _ in range(n):
            ids = torch.randint(CLASSES, VOCAB, (LENGTH,), generator=g)
            ids[0] = label  # tokens 0..3 mark the class
            items.append({"input_ids": ids, "labels": torch.tensor(label)})
    return items


def main(argv=None) -> float:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--steps", type=int, default=10)
    args = args.parse_args(argv)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=LENGTH, num_labels=CLASSES))
    optimizer = imbsam.ImbSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=16, max_steps=args.steps, use_cpu=True, report_to=[],
            save_strategy="no", logging_steps=5, remove_unused_columns=False)
        trainer = SharpnessTrainer(model=model, args=training, train_dataset=long_tailed_sequences(),
                                   optimizers=(optimizer, None))  # head_tail_loss: from the labels
        result = trainer.train()
    print(f"after {trainer.state.global_step} ImbSAM steps: training loss {result.training_loss:.4f}; "
          f"tail classes {trainer.head_tail_loss.tail_classes.nonzero().flatten().tolist()}")
    return result.training_loss


if __name__ == "__main__":
    main()
