"""``lionkit demo``: AdamW, Lion and Lion8bit side by side on a small real task, on the CPU.

The task is scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; shipped
inside the scikit-learn wheel, so nothing is downloaded). A two-hidden-layer MLP is trained
with each optimizer from the same initial weights, on the same batches, under the same cosine
learning-rate schedule (a plain ``torch.optim.lr_scheduler``). The hidden weight matrices have
more than ``min_8bit_size=4096`` elements, so ``Lion8bit`` really keeps them in 8 bits; the
10x256 output matrix and the biases are smaller and stay fp32, as in bitsandbytes.

What it prints, per optimizer: final training loss, validation loss and accuracy, the bytes of
optimizer state per parameter *measured from the state tensors* (shared tensors such as the
8-bit map counted once), and the mean wall time of ``optimizer.step()``. It writes a PNG of the
loss curves and, on request, a JSON of every number.

The hyperparameters follow the Lion paper's advice: Lion's lr is 10x smaller than AdamW's and its
weight decay 10x larger, so ``lr * weight_decay`` is the same for all three (see ``OPTIMIZERS``).

Example::

    lionkit demo --epochs 30 --out curves.png --json results.json
    python -m lionkit demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .lion import Lion, Lion8bit

DESCRIPTION = (
    "Train a small MLP on scikit-learn's bundled digits with torch.optim.AdamW, lionkit.Lion and "
    "lionkit.Lion8bit (CPU, no download); print final loss, accuracy, optimizer-state bytes per "
    "parameter and step time, and plot the loss curves."
)
DEMO_INSTALL_HINT = "pip install 'lionkit[demo]'"

DEFAULT_EPOCHS = 20
DEFAULT_SEED = 0
DEFAULT_OUT = "lionkit-demo.png"
DEFAULT_THREADS = 1
BATCH_SIZE = 64
HIDDEN = 256
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class OptimizerSpec:
    """One contender: a display name, the hyperparameters and how to build it."""

    name: str
    lr: float
    weight_decay: float
    build: Callable[..., torch.optim.Optimizer]
    betas: tuple[float, float] = (0.9, 0.999)


# The paper's advice: Lion's lr 3-10x smaller than AdamW's, weight decay 3-10x larger (here 10x
# both ways, so lr * weight_decay is the same). Chosen from a small sweep on this task over 3 seeds
# (AdamW lr 1e-3..3e-2; Lion lr 1e-4..5e-3, weight decay 0.03..3, betas (0.9, 0.99) /
# (0.95, 0.98) / (0.9, 0.999)); betas (0.95, 0.98) generalised best for Lion at this small batch.
_LION_BETAS = (0.95, 0.98)
OPTIMIZERS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        "AdamW", 1e-2, 0.01, lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    ),
    OptimizerSpec(
        "Lion", 1e-3, 0.1, lambda params, lr, wd: Lion(params, lr=lr, betas=_LION_BETAS, weight_decay=wd), _LION_BETAS
    ),
    OptimizerSpec(
        "Lion8bit",
        1e-3,
        0.1,
        lambda params, lr, wd: Lion8bit(params, lr=lr, betas=_LION_BETAS, weight_decay=wd),
        _LION_BETAS,
    ),
)


@dataclass
class RunResult:
    """Everything measured for one optimizer."""

    optimizer: str
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    final_train_loss: float
    val_loss: float
    val_accuracy: float
    state_bytes_per_param: float
    step_ms: float
    train_loss: list[float] = field(default_factory=list)  # mean per epoch
    val_loss_curve: list[float] = field(default_factory=list)  # epoch 0 (before training) .. epochs
    val_accuracy_curve: list[float] = field(default_factory=list)


def _require_demo_deps() -> tuple[Any, Any, Any]:
    """Import matplotlib (Agg), scikit-learn's digits loader and tqdm, or say how to install them."""
    missing = []
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        missing.append("matplotlib")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        missing.append("scikit-learn")
    try:
        from tqdm.auto import tqdm
    except ImportError:
        missing.append("tqdm")
    if missing:
        raise ImportError(f"lionkit demo needs {', '.join(missing)}: {DEMO_INSTALL_HINT}")
    return plt, load_digits, tqdm


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as (x_train, y_train, x_val, y_val): pixels scaled to [0, 1], a stratified split
    fixed by ``seed``."""
    _require_demo_deps()
    from .tasks import digits_split

    return digits_split(torch.Generator().manual_seed(seed), VAL_FRACTION)  # type: ignore[return-value]


def make_model(seed: int) -> torch.nn.Module:
    """64 -> 256 -> 256 -> 10 MLP; the two hidden weight matrices (16,384 and 65,536 elements)
    are above ``min_8bit_size`` so ``Lion8bit`` stores their momentum in 8 bits."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, 10),
    )


def state_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    """Bytes of every tensor in ``opt.state`` divided by the number of parameters; a storage
    shared by several parameters (the 8-bit map) is counted once, plain numbers not at all."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in opt.state.values():
        for value in st.values():
            tensors = value.values() if isinstance(value, dict) else [value]  # bnb-style nesting
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key in seen and key[0] != 0:
                    continue
                seen.add(key)
                total += t.numel() * t.element_size()
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return total / n_params


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the whole set."""
    model.eval()
    logits = model(x)
    model.train()
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


def train_one(
    spec: OptimizerSpec,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    epochs: int,
    seed: int,
    progress: Optional[Callable[..., Any]] = None,
) -> RunResult:
    """Train a fresh model (same init for every optimizer) and measure it."""
    x_tr, y_tr, x_va, y_va = data
    model = make_model(seed)
    opt = spec.build(model.parameters(), spec.lr, spec.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / BATCH_SIZE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)  # same batch order for every optimizer

    v_loss, v_acc = evaluate(model, x_va, y_va)
    val_losses, val_accs, train_losses, step_times = [v_loss], [v_acc], [], []
    bar = progress(range(epochs), desc=f"{spec.name:>8}", unit="epoch", leave=True) if progress else range(epochs)
    for _ in bar:
        order = torch.randperm(len(x_tr), generator=gen)
        epoch_loss = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            sched.step()
            epoch_loss += loss.item() * len(idx)
        train_losses.append(epoch_loss / len(x_tr))
        v_loss, v_acc = evaluate(model, x_va, y_va)
        val_losses.append(v_loss)
        val_accs.append(v_acc)
        if progress:
            bar.set_postfix(train_loss=f"{train_losses[-1]:.3f}", val_acc=f"{v_acc:.3f}")

    # the first step also builds the state; time the steady state when there is one
    timed = step_times[1:] or step_times
    final_train_loss, _ = evaluate(model, x_tr, y_tr)
    return RunResult(
        optimizer=spec.name,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        betas=spec.betas,
        final_train_loss=final_train_loss,
        val_loss=val_losses[-1],
        val_accuracy=val_accs[-1],
        state_bytes_per_param=state_bytes_per_param(opt),
        step_ms=1000.0 * sum(timed) / len(timed),
        train_loss=train_losses,
        val_loss_curve=val_losses,
        val_accuracy_curve=val_accs,
    )


def format_table(results: Sequence[RunResult]) -> str:
    """The results as a fixed-width text table."""
    header = ("optimizer", "lr", "wd", "betas", "train loss", "val loss", "val acc", "state B/param", "step ms")
    rows = [
        (
            r.optimizer,
            f"{r.lr:g}",
            f"{r.weight_decay:g}",
            f"{r.betas[0]:g},{r.betas[1]:g}",
            f"{r.final_train_loss:.4f}",
            f"{r.val_loss:.4f}",
            f"{100 * r.val_accuracy:.1f}%",
            f"{r.state_bytes_per_param:.3f}",
            f"{r.step_ms:.3f}",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    return "\n".join(out)


def plot(results: Sequence[RunResult], path: str, title: str) -> None:
    """Loss curves (train solid, validation dashed) and validation accuracy, one colour per optimizer."""
    plt, _, _ = _require_demo_deps()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    for i, (r, color) in enumerate(zip(results, colors)):
        # later curves thinner, so one that lies on another (Lion8bit on Lion) leaves both visible
        lw = max(1.0, 3.2 - 0.8 * i)
        epochs_tr = range(1, len(r.train_loss) + 1)
        epochs_va = range(0, len(r.val_loss_curve))
        ax_loss.plot(epochs_tr, r.train_loss, color=color, lw=lw, label=f"{r.optimizer} train")
        ax_loss.plot(epochs_va, r.val_loss_curve, color=color, lw=lw, linestyle="--", label=f"{r.optimizer} val")
        ax_acc.plot(epochs_va, [100 * a for a in r.val_accuracy_curve], color=color, lw=lw, label=r.optimizer)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch (0 = before training)")
    ax_loss.set_ylabel("cross-entropy (log scale)")
    ax_loss.set_title("loss")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend(fontsize=8, ncol=2)
    ax_acc.set_xlabel("epoch (0 = before training)")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_title("validation accuracy")
    lo = min(min(r.val_accuracy_curve[1:] or r.val_accuracy_curve) for r in results)
    ax_acc.set_ylim(max(0.0, 100 * lo - 5), 100.5)
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    out: Optional[str] = DEFAULT_OUT,
    json_path: Optional[str] = None,
    progress: bool = True,
    threads: Optional[int] = DEFAULT_THREADS,
    stream: Any = None,
) -> list[RunResult]:
    """Train with every optimizer in ``OPTIMIZERS``, print the table to ``stream`` (stdout),
    write the PNG to ``out`` (skipped when None) and the JSON to ``json_path`` (when given).

    ``threads`` sets ``torch.set_num_threads`` for the run (restored afterwards); None keeps
    torch's setting. One thread is the default because this model is too small to gain from
    more, and a busy machine makes a multi-threaded pool spin and stall."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs!r} (must be an int >= 1)")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"Invalid threads: {threads!r} (must be an int >= 1, or None)")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(epochs, seed, out, json_path, progress, sys.stdout if stream is None else stream)
    finally:
        torch.set_num_threads(saved_threads)


def _run(epochs: int, seed: int, out: Optional[str], json_path: Optional[str], progress: bool, stream: Any) -> list[RunResult]:
    """``run`` once the thread count is set."""
    _, _, tqdm = _require_demo_deps()
    data = load_data(seed)
    n_params = sum(p.numel() for p in make_model(seed).parameters())
    print(
        f"digits: {len(data[0])} train / {len(data[2])} validation images; MLP with {n_params:,} parameters; "
        f"{epochs} epoch{'s' if epochs != 1 else ''} of batch {BATCH_SIZE}, cosine lr; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}",
        file=stream,
    )
    start = time.perf_counter()
    bar = (lambda it, **kw: tqdm(it, file=sys.stderr, **kw)) if progress else None
    results = [train_one(spec, data, epochs, seed, bar) for spec in OPTIMIZERS]
    elapsed = time.perf_counter() - start
    # files first, so they exist even if the terminal goes away while we print
    written = []
    if out:
        plot(results, out, f"lionkit demo: digits MLP ({n_params:,} params), {epochs} epochs, seed {seed}")
        written.append(out)
    if json_path:
        write_json(results, json_path, epochs=epochs, seed=seed, n_params=n_params, elapsed_s=elapsed)
        written.append(json_path)
    print("", file=stream)
    print(format_table(results), file=stream)
    print(
        "train loss: on the whole training set after the last epoch; state B/param: bytes of the optimizer's\n"
        "state tensors / parameters (Lion8bit keeps tensors under min_8bit_size=4096, here the output layer\n"
        "and biases, in fp32); step ms: mean wall time of optimizer.step().",
        file=stream,
    )
    print(f"\ntrained {len(results)} models in {elapsed:.1f} s", file=stream)
    for path in written:
        print(f"wrote {path}", file=stream)
    return results


def write_json(results: Sequence[RunResult], path: str, **info: Any) -> None:
    """Every number of the run (per-epoch curves included) as JSON."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {
        "task": "sklearn digits, MLP 64-256-256-10",
        "batch_size": BATCH_SIZE,
        "torch": torch.__version__,
        **info,
        "results": [asdict(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options (shared by ``lionkit demo`` and ``python -m lionkit.demo``)."""
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs per optimizer (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed for the split, init and batches (default {DEFAULT_SEED})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"PNG of the loss curves (default {DEFAULT_OUT})")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help=f"torch threads for the run (default {DEFAULT_THREADS})"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _unwritable(path: str) -> Optional[str]:
    """Why ``path`` cannot be written (its folder is created if missing), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot create its folder ({e.strerror or e})"
    if os.path.isdir(path):
        return "is a directory"
    if not os.access(folder, os.W_OK):
        return f"folder {folder!r} is not writable"
    return None


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed options; 0 on success."""
    for name in ("epochs", "threads"):
        if getattr(args, name) < 1:
            print(f"lionkit demo: error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    # the output files' folders, before the training (which a bad path would otherwise waste)
    for option, path in (("--out", args.out), ("--json", args.json_path)):
        problem = _unwritable(path) if path else None
        if problem:
            print(f"lionkit demo: error: {option} {path!r}: {problem}", file=sys.stderr)
            return 2
    run(
        epochs=args.epochs,
        seed=args.seed,
        out=args.out,
        json_path=args.json_path,
        progress=not args.no_progress,
        threads=args.threads,
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lionkit.demo [options]``."""
    parser = argparse.ArgumentParser(prog="lionkit demo", description=DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
