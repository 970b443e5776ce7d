"""The small real training tasks behind ``lionkit compare`` and the 4-bit study: data that ships
with the install, models, a training loop, and what is measured.

Two tasks of different kinds, both on the CPU and with nothing downloaded:

* ``charlm``: a character-level causal transformer language model on the Python language
  reference that ships inside CPython itself (``pydoc_data.topics``: the text ``help("if")``
  prints, about 465,000 characters of English prose, grammar and examples). The text is read
  at run time, never copied into lionkit; its SHA-256 and the Python version are recorded with
  every result, because another Python release ships slightly different text.
* ``digits``: a two-hidden-layer MLP on scikit-learn's bundled handwritten digits (1,797 8x8
  images, 10 classes), made harder by augmentation: every image is shifted by up to one pixel
  and overlaid with Gaussian pixel noise, fresh for every training batch and fixed (10 copies
  of each held-out image) for validation. Without it the task is solved to a validation loss of
  0.01-0.05 that a handful of images decide, and two seeds of the same optimizer differ by 30%,
  which would hide any difference between optimizers; with it the loss stays near 0.3 and the
  seeds agree to a few percent.

Every run of a task is fixed by its seed: the same seed gives the same initial weights and the
same batches whatever the optimizer, so optimizers are compared on paired runs.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

TASK_NAMES = ("charlm", "digits")


# ---------------------------------------------------------------------------------- data
def python_docs_corpus() -> str:
    """The Python language reference shipped with CPython (``pydoc_data.topics``), its topics
    joined in sorted order. Raises ImportError when the interpreter was built without it."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split it into a separate package
        raise ImportError(
            "the charlm task reads the Python reference that ships with CPython (pydoc_data.topics), "
            "which this Python lacks: install your distribution's full Python standard library "
            "(e.g. apt install libpython3-stdlib), or run with --tasks digits"
        ) from e
    return "\n\n".join(topics[k] for k in sorted(topics))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------- models
class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A small GPT-style character model: token + learned position embeddings, ``layers``
    pre-norm blocks, a final LayerNorm and an (untied) output layer."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled down by depth
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ---------------------------------------------------------------------------------- tasks
class Task:
    """What a training run needs from a task (the subclasses below)."""

    name: str = ""
    kind: str = ""
    description: str = ""

    def make_model(self, seed: int, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def batch(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "description": self.description}


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # the loss in fp32 whatever the model's dtype: a bf16 log-softmax would add its own error
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


class CharLMTask(Task):
    """Next-character prediction on the Python reference (see the module docstring).

    The text is cut into 2,048-character blocks; every 10th block is held out for validation.
    Training batches are random windows of ``context + 1`` characters from the training blocks;
    validation is a fixed set of ``val_windows`` non-overlapping windows. Accuracy is
    next-character accuracy."""

    kind = "language model"

    def __init__(
        self,
        d: int = 128,
        heads: int = 4,
        layers: int = 2,
        context: int = 64,
        batch_size: int = 32,
        val_windows: int = 256,
        text: Optional[str] = None,
    ) -> None:
        self.name = "charlm"
        text = python_docs_corpus() if text is None else text
        chars = sorted(set(text))
        self.vocab = len(chars)
        lookup = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        block = 2048
        n_blocks = len(data) // block
        blocks = data[: n_blocks * block].view(n_blocks, block)
        is_val = torch.arange(n_blocks) % 10 == 9
        self.train_data = torch.cat([blocks[~is_val].reshape(-1), data[n_blocks * block :]])
        val = blocks[is_val]
        per_block = block // (context + 1)
        windows = val[:, : per_block * (context + 1)].reshape(-1, context + 1)
        self.val_windows = windows[:val_windows]
        self.d, self.heads, self.layers, self.context, self.batch_size = d, heads, layers, context, batch_size
        self.corpus_chars = len(text)
        self.corpus_sha256 = _sha256(text)
        self.description = (
            f"character-level transformer LM ({layers} layers, d={d}, {heads} heads, context {context}) on the "
            f"Python language reference shipped with CPython ({len(text):,} characters, vocabulary {self.vocab}); "
            f"batch {batch_size} windows; validation: {len(self.val_windows)} held-out windows"
        )

    def make_model(self, seed: int, dtype: torch.dtype) -> nn.Module:
        torch.manual_seed(seed)
        return CharTransformer(self.vocab, self.d, self.heads, self.layers, self.context).to(dtype)

    def batch(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(self.train_data) - self.context - 1, (self.batch_size,), generator=gen)
        win = self.train_data[start[:, None] + torch.arange(self.context + 1)]
        return win[:, :-1], win[:, 1:]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return _cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        model.eval()
        total, correct, n = 0.0, 0, 0
        for s in range(0, len(self.val_windows), 64):
            win = self.val_windows[s : s + 64]
            logits = model(win[:, :-1]).float()
            y = win[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1), reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += y.numel()
        model.train()
        return total / n, correct / n

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "corpus": "pydoc_data.topics (CPython's bundled language reference)",
            "corpus_chars": self.corpus_chars,
            "corpus_sha256": self.corpus_sha256,
            "python": sys.version.split()[0],
            "train_tokens": len(self.train_data),
            "val_tokens": int(self.val_windows[:, 1:].numel()),
        }


def digits_split(gen: torch.Generator, val_fraction: float = 0.2) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits as (x_train, y_train, x_val, y_val), pixels scaled to [0, 1]: a
    stratified split (the same fraction of every class held out), shuffled by ``gen``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data comes with scikit-learn: pip install 'lionkit[demo]'") from e
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, va = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = round(len(idx) * val_fraction)
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    tr_i, va_i = torch.cat(tr), torch.cat(va)
    return x[tr_i], y[tr_i], x[va_i], y[va_i]


class DigitsTask(Task):
    """scikit-learn's bundled digits: 64 -> hidden -> hidden -> 10 GELU MLP, a stratified 80/20
    split fixed once (not by the run's seed, so every run sees the same validation set).

    Augmentation (``noise`` > 0 or ``shift``): each image moves by -1, 0 or +1 pixel in each
    direction (zeros shifted in) and gets N(0, noise^2) added to its pixels (scaled to [0, 1]);
    training batches are augmented afresh from the run's generator, the validation set is
    ``val_copies`` augmented copies of each held-out image, drawn once from ``split_seed``."""

    kind = "image classifier"

    def __init__(
        self,
        hidden: int = 256,
        batch_size: int = 64,
        split_seed: int = 0,
        noise: float = 0.2,
        shift: bool = True,
        val_copies: int = 10,
    ) -> None:
        self.name = "digits"
        gen = torch.Generator().manual_seed(split_seed)
        self.x_tr, self.y_tr, self.x_va, self.y_va = digits_split(gen)
        self.noise, self.shift = noise, shift
        self.held_out = len(self.y_va)
        if noise > 0 or shift:
            self.x_va = self.augment(self.x_va.repeat(val_copies, 1), gen)
            self.y_va = self.y_va.repeat(val_copies)
        self.hidden, self.batch_size = hidden, batch_size
        self._order: Optional[torch.Tensor] = None
        aug = (
            f", augmented (shifts of up to 1 pixel, Gaussian pixel noise sd {noise:g}); validation: "
            f"{val_copies} augmented copies of each held-out image"
            if noise > 0 or shift else ""
        )
        self.description = (
            f"MLP 64-{hidden}-{hidden}-10 on scikit-learn's bundled digits ({len(self.x_tr)} train / "
            f"{self.held_out} held-out images){aug}; batch {batch_size}, reshuffled every epoch"
        )

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Shifted (by -1..1 pixel each way) and noisy copies of the flat 8x8 images ``x``."""
        n = len(x)
        if self.shift:
            padded = F.pad(x.view(n, 8, 8), (1, 1, 1, 1))
            dy = torch.randint(0, 3, (n,), generator=gen)
            dx = torch.randint(0, 3, (n,), generator=gen)
            rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(n, 8, 8)
            cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(n, 8, 8)
            x = padded[torch.arange(n)[:, None, None], rows, cols].reshape(n, 64)
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=gen)
        return x

    def make_model(self, seed: int, dtype: torch.dtype) -> nn.Module:
        torch.manual_seed(seed)
        h = self.hidden
        model = nn.Sequential(nn.Linear(64, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 10))
        return model.to(dtype)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.x_tr) / self.batch_size)

    def batch(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        i = step % self.steps_per_epoch
        if i == 0 or self._order is None:
            self._order = torch.randperm(len(self.x_tr), generator=gen)
        idx = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        x = self.x_tr[idx]
        if self.noise > 0 or self.shift:
            x = self.augment(x, gen)
        return x, self.y_tr[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return _cross_entropy(model(x.to(_dtype_of(model))), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        model.eval()
        logits = model(self.x_va.to(_dtype_of(model))).float()
        model.train()
        return F.cross_entropy(logits, self.y_va).item(), (logits.argmax(1) == self.y_va).float().mean().item()


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def make_task(name: str, quick: bool = False) -> Task:
    """The task called ``name`` (one of ``TASK_NAMES``); ``quick`` makes the LM smaller."""
    if name == "charlm":
        return CharLMTask(d=64, layers=1, context=32, batch_size=16, val_windows=64) if quick else CharLMTask()
    if name == "digits":
        return DigitsTask()
    raise ValueError(f"Invalid task: {name!r} (must be one of {', '.join(TASK_NAMES)})")


# ---------------------------------------------------------------------------------- training
@dataclass
class RunRecord:
    """Everything measured in one training run."""

    task: str
    config: str
    seed: int
    steps: int
    final_val_loss: float
    best_val_loss: float
    final_val_accuracy: float
    best_val_accuracy: float
    final_train_loss: float  # mean of the last 10% of steps' batch losses
    n_params: int
    weight_bytes_per_param: float
    state_bytes_per_param: float
    total_bytes_per_param: float  # weights + optimizer state
    wall_s: float
    cpu_s: float  # process CPU time: what the run costs, whatever else shares the machine
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean batch loss between evaluations
    nonfinite: bool = False  # the loss diverged to NaN/inf (the run stopped there)


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct tensors in ``tensors`` (nested dicts/lists allowed); a storage
    shared by several entries (e.g. the 8-bit map) is counted once, plain numbers not at all."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[0] != 0 and key in seen:
                return
            seen.add(key)
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(tensors)
    return total


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    task: Task,
    build_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    seed: int,
    steps: int,
    param_dtype: torch.dtype = torch.float32,
    evals: int = 10,
    warmup_fraction: float = 0.05,
    config_name: str = "",
) -> RunRecord:
    """Train a fresh model of ``task`` for ``steps`` steps and measure it.

    The model is built (``param_dtype`` weights, the arithmetic in that dtype too) and batches
    drawn from ``seed`` alone; the learning rate follows ``lr_factor`` through a
    ``LambdaLR`` on the optimizer. Validation runs ``evals`` times, evenly spaced, plus once
    before training."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    model = task.make_model(seed, param_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params)
    warmup = max(1, round(warmup_fraction * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    gen = torch.Generator().manual_seed(10_000 + seed)
    eval_at = sorted({round(steps * k / evals) for k in range(1, evals + 1)})
    loss0, acc0 = task.evaluate(model)
    rec = RunRecord(
        task=task.name, config=config_name, seed=seed, steps=steps, final_val_loss=math.nan, best_val_loss=math.nan,
        final_val_accuracy=math.nan, best_val_accuracy=math.nan, final_train_loss=math.nan,
        n_params=sum(p.numel() for p in params), weight_bytes_per_param=0.0, state_bytes_per_param=0.0,
        total_bytes_per_param=0.0, wall_s=0.0, cpu_s=0.0,
        eval_steps=[0], val_loss=[loss0], val_accuracy=[acc0],
    )
    window: list[float] = []
    tail: list[float] = []
    tail_from = steps - max(1, steps // 10)
    for step in range(steps):
        loss = task.loss(model, task.batch(step, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        if not math.isfinite(value):
            rec.nonfinite = True
            break
        window.append(value)
        if step >= tail_from:
            tail.append(value)
        if step + 1 in eval_at:
            v_loss, v_acc = task.evaluate(model)
            rec.eval_steps.append(step + 1)
            rec.val_loss.append(v_loss)
            rec.val_accuracy.append(v_acc)
            rec.train_loss.append(sum(window) / len(window))
            window = []
    n = rec.n_params
    rec.weight_bytes_per_param = tensor_bytes(params) / n
    rec.state_bytes_per_param = tensor_bytes(list(opt.state.values())) / n
    rec.total_bytes_per_param = rec.weight_bytes_per_param + rec.state_bytes_per_param
    if rec.nonfinite:
        rec.final_val_loss = rec.best_val_loss = math.inf
        rec.final_val_accuracy = rec.best_val_accuracy = 0.0
    else:
        rec.final_val_loss, rec.final_val_accuracy = rec.val_loss[-1], rec.val_accuracy[-1]
        rec.best_val_loss, rec.best_val_accuracy = min(rec.val_loss), max(rec.val_accuracy)
        rec.final_train_loss = sum(tail) / len(tail)
    rec.wall_s = time.perf_counter() - wall0
    rec.cpu_s = time.process_time() - cpu0
    return rec
