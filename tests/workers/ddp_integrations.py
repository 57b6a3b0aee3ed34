"""Launched by tests/test_distributed_integrations.py: the Hugging Face Trainer (under torchrun)
or Lightning (strategy="ddp", devices=N) trains with LogIX's callback on CPU with gloo.

    python ddp_integrations.py hf|lightning ROOT PROCESSES
The learning rate is 0, so every row is the gradient at the same weights and a 2-process log
must equal the 1-process log row for row.
"""

import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

import logix

N = 16


def hf(root: str, processes: int) -> None:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from logix.integrations.huggingface import LogIXCallback

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=16, num_labels=2, attn_implementation="eager"))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 40, (6,), generator=g),
             "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.randint(0, 2, (), generator=g), "idx": torch.tensor(i)}
            for i in range(N)]
    run = logix.init(f"hf-{processes}", root_dir=root, rank=2)
    run.watch(model, type_filter=[nn.Linear])
    run.add_lora()
    run.setup({"grad": ["log"]})
    run.save(True)
    args = TrainingArguments(output_dir=os.path.join(root, "out"), per_device_train_batch_size=4,
                             learning_rate=0.0, num_train_epochs=1, use_cpu=True,
                             ddp_backend="gloo" if processes > 1 else None, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[LogIXCallback(run, data_id_column="idx")])
    trainer.train()


class Classifier(__import__("lightning").LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def training_step(self, batch, _):
        x, y, _ids = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def lightning(root: str, processes: int) -> None:
    import lightning as L

    from logix.integrations.lightning import LogIXCallback

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(N, 5, generator=g),
                                          torch.randint(0, 3, (N,), generator=g), torch.arange(N))
    module = Classifier()
    run = logix.init(f"lightning-{processes}", root_dir=root, rank=2)
    run.watch(module.net)
    run.add_lora()
    run.setup({"grad": ["log"]})
    run.save(True)
    trainer = L.Trainer(accelerator="cpu", devices=processes,
                        strategy="ddp" if processes > 1 else "auto", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[LogIXCallback(run, data_id_fn=lambda b: b[2])])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))


if __name__ == "__main__":
    from teardown import exit_cleanly

    {"hf": hf, "lightning": lightning}[sys.argv[1]](sys.argv[2], int(sys.argv[3]))
    exit_cleanly()
