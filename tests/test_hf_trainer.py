"""Hugging Face Transformers: any lionkit optimizer in ``Trainer``, on a tiny randomly initialised
GPT-2 built from a config (no downloads), including save and ``resume_from_checkpoint``: the
resumed run ends where the uninterrupted one does, bit for bit.

Two ways are tested (docs/distributed.md): ``optimizer_cls_and_kwargs=(cls, kwargs)`` (Trainer
builds the optimizer, with its weight-decay/no-decay parameter groups, after wrapping the model)
and ``optimizers=(optimizer, scheduler)``. Transformers has no public registry for new ``optim``
names (``optim="lion_8bit"`` means bitsandbytes), so these are the supported hooks.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import lionkit

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face Transformers not installed (pip install 'lionkit[hf]')"
)
pytest.importorskip("accelerate", reason="Trainer needs accelerate (pip install 'lionkit[hf]')")

MAX_STEPS, SAVE_EVERY = 6, 3


class TokenData(torch.utils.data.Dataset):
    """Random token sequences, labels = inputs (causal LM)."""

    def __init__(self, n: int = 48, length: int = 16, vocab: int = 128) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def arguments(folder: str) -> "transformers.TrainingArguments":
    return transformers.TrainingArguments(
        output_dir=folder,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


LION_KWARGS = {"lr": 3e-3, "min_8bit_size": 1024, "percentile_clipping": 95}


def with_cls_and_kwargs(model, folder):
    # keep the token embedding (tied to the output layer) in fp32, as bitsandbytes' users do
    lionkit.GlobalOptimManager.get_instance().register_module_override(model.transformer.wte, "weight", {"optim_bits": 32})
    return transformers.Trainer(
        model=model,
        args=arguments(folder),
        train_dataset=TokenData(),
        optimizer_cls_and_kwargs=(lionkit.Lion8bit, LION_KWARGS),
    )


def with_optimizer_and_scheduler(model, folder):
    opt = lionkit.Lion(model.parameters(), lr=3e-3, weight_decay=0.1, grad_clip_norm=1.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=MAX_STEPS)
    return transformers.Trainer(
        model=model, args=arguments(folder), train_dataset=TokenData(), optimizers=(opt, sched)
    )


@pytest.mark.parametrize("make", [with_cls_and_kwargs, with_optimizer_and_scheduler], ids=["cls_and_kwargs", "optimizers"])
def test_trainer_resume_equals_uninterrupted(tmp_path, make):
    full = make(tiny_gpt2(), str(tmp_path / "full"))
    full.train()
    opt = full.optimizer.optimizer  # Trainer wraps it in accelerate's AcceleratedOptimizer
    assert isinstance(opt, lionkit.Lion8bit if make is with_cls_and_kwargs else lionkit.Lion)
    assert all(st["step"] == MAX_STEPS for st in opt.state.values())
    if make is with_cls_and_kwargs:
        model = full.model
        dtypes = {name: opt.state[p]["state1"].dtype for name, p in model.named_parameters()}
        assert dtypes["transformer.wte.weight"] == torch.float32  # the override
        assert dtypes["transformer.h.0.attn.c_attn.weight"] == torch.uint8  # 8-bit state
        # Trainer's decay / no-decay groups reached the optimizer
        assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.1]
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"
    assert (checkpoint / "optimizer.pt").exists()

    resumed = make(tiny_gpt2(), str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert all(st["step"] == MAX_STEPS for st in resumed.optimizer.optimizer.state.values())
    want = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, want[name]), name
    # and the training moved the weights at all
    assert not torch.equal(want["transformer.h.0.attn.c_attn.weight"], dict(tiny_gpt2().named_parameters())["transformer.h.0.attn.c_attn.weight"])
