"""What a training batch does on its way to a GPU, checked on the CPU: DataLoader's pinning reaches every tensor."""

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from iqa_cli.training.data import TrainBatch


def test_pinned_loading_pins_every_tensor_of_a_train_batch(monkeypatch):
    """DataLoader(pin_memory=True) pins what it loads through the batch's own `pin_memory()`; a batch type without
    one came back as it was, so `to(cuda, non_blocking=True)` copied synchronously from pageable memory. Pinning
    needs a GPU, so `Tensor.pin_memory` is recorded here instead of run."""
    pinned: list[int] = []

    def record(tensor, device=None):
        copy = tensor.clone()
        pinned.append(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", record)
    n, t = 2, 5
    batch = TrainBatch(
        visual={"pixel_values": torch.rand(n, 3, 4, 4), "image_ids": torch.ones(n, 3, dtype=torch.long)},
        input_ids=torch.ones(n, t, dtype=torch.long),
        attention_mask=torch.ones(n, t, dtype=torch.long),
        labels=torch.zeros(n, t, dtype=torch.long),
        level_pos=torch.tensor([3, 4]),
        soft_labels=torch.rand(n, 5),
        mos=torch.rand(n),
        std=torch.rand(n),
        level=torch.tensor([1, 2]),
        group=torch.zeros(n, dtype=torch.long),
        pairs=0,
        skipped=["a.png: truncated"],
    )
    out = pin_memory(batch)  # what DataLoader's pinning thread calls on each batch
    assert isinstance(out, TrainBatch) and out.pairs == 0 and out.skipped == ["a.png: truncated"]
    tensors = [v for v in vars(out).values() if isinstance(v, torch.Tensor)] + list(out.visual.values())
    assert len(tensors) == 11 and sorted(id(x) for x in tensors) == sorted(pinned)
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(out, name), value), name
