"""A tiny deterministic token dataset with the training data interface, for engine tests."""

import torch


class SyntheticDataset:
    """Rows of learnable token patterns (each row counts up from a random start modulo the vocab)."""

    def __init__(self, rows: int = 64, seq_length: int = 16, vocab: int = 256, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(3, vocab, (rows,), generator=gen)
        steps = torch.randint(1, 4, (rows,), generator=gen)
        ar = torch.arange(seq_length + 1)
        self.data = (starts[:, None] + steps[:, None] * ar[None, :]) % vocab
        self.seq_length = seq_length

    def __len__(self):
        return self.data.shape[0]

    def __getitem__(self, i):
        row = self.data[i]
        mask = torch.ones(self.seq_length)
        mask[: self.seq_length // 4] = 0  # a "prompt" part without loss
        return {"tokens": row[:-1].clone(), "labels": row[1:].clone(), "loss_mask": mask,
                "position_ids": torch.arange(self.seq_length), "segment_ids": torch.zeros(self.seq_length, dtype=torch.long)}

    def epoch_order(self, epoch, seed):
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()

    @staticmethod
    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
