"""Lightning: a lionkit optimizer (and a per-step scheduler) from ``configure_optimizers``, on a
tiny model on the CPU, with a checkpoint after the first epoch and ``fit(ckpt_path=...)``: the
resumed run ends where the uninterrupted one does, bit for bit."""

from __future__ import annotations

import pytest
import torch

import lionkit

L = pytest.importorskip("lightning.pytorch", reason="Lightning not installed (pip install 'lionkit[lightning]')")

EPOCHS = 2


class TinyRegressor(L.LightningModule):
    """The example of docs/distributed.md: Lion8bit with a cosine schedule stepped per batch."""

    def __init__(self, optim_bits: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
        self.optim_bits = optim_bits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = lionkit.Lion(
            self.parameters(), lr=3e-3, weight_decay=0.1, optim_bits=self.optim_bits, min_8bit_size=1024,
            percentile_clipping=95,
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * 3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 16, generator=gen)
    y = torch.randn(24, 4, generator=gen)
    # shuffle=False: Lightning does not restore the global RNG that a shuffling loader draws from
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(folder, callbacks=()) -> "L.Trainer":
    return L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        default_root_dir=str(folder),
    )


@pytest.mark.parametrize("bits", [8, 32])
def test_lightning_resume_equals_uninterrupted(tmp_path, bits):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    full = TinyRegressor(bits)
    trainer(tmp_path / "full", [ckpt_cb]).fit(full, loader())
    opt = full.trainer.optimizers[0]
    assert isinstance(opt, lionkit.Lion)
    big = full.net[0].weight
    assert opt.state[big]["state1"].dtype == (torch.uint8 if bits == 8 else torch.float32)
    assert opt.state[big]["step"] == EPOCHS * 3
    first = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    assert len(first) == 1

    resumed = TinyRegressor(bits)
    again = ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"), save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path / "resumed", [again]).fit(resumed, loader(), ckpt_path=str(first[0]))
    assert resumed.trainer.optimizers[0].state[resumed.net[0].weight]["step"] == EPOCHS * 3
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(full.net[0].weight, TinyRegressor(bits).net[0].weight)  # it trained
