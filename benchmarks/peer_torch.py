"""A PyTorch port of the book's SepReformer, its training loss, optimizer and windowed separation: the peer that
benchmarks/bench_peer.py times against the JAX library, and tests/test_peer.py checks number for number.

Same architecture as `sepreformer_book.model.SepReformer` (any ModelConfig), written the way a PyTorch user would
write it: batched (B, T) -> (B, N, T), the reconstruction blocks shared by the stems as one batch of B * N sequences,
attention through `F.scaled_dot_product_attention` with a boolean key mask, Snake as an autograd Function with the
same hand-written derivatives as the JAX `custom_jvp`. `load_jax_weights` copies a JAX model's weights in;
`jax_layout` maps a JAX pytree of the model's shape (the model, or its gradient) to the torch parameter names.

Needs PyTorch: `pip install -e ".[peer]"` (a CPU-only wheel is enough).
"""

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sepreformer_book.conv import padded_length
from sepreformer_book.fit import OptimizerConfig
from sepreformer_book.inference import crossfade_weights, window_starts
from sepreformer_book.losses import EPS, SI_SDR_CAP_DB, STFT_RESOLUTIONS
from sepreformer_book.model import ModelConfig
from sepreformer_book.snake import SMALL_ALPHA

LAYER_NORM_EPS = 1e-5  # eqx.nn.LayerNorm's default
ROPE_THETA = 10_000.0  # eqx.nn.RotaryPositionalEmbedding's default


# ---------------------------------------------------------------------------------------------------------- Snake
def _snake_ripple(x, alpha):
    """sin(alpha x) and the ripple sin^2(alpha x) / alpha (alpha x^2 on channels with |alpha| < SMALL_ALPHA)."""
    small = alpha.abs() < SMALL_ALPHA
    inv_alpha = 1.0 / torch.where(small, torch.ones_like(alpha), alpha)  # never a tiny divisor
    sin_z = torch.sin(alpha * x)
    return sin_z, torch.where(small, alpha * x.square(), sin_z.square() * inv_alpha)


class SnakeFunction(torch.autograd.Function):
    """x + sin^2(alpha x) / alpha, with the series alpha x^2 where |alpha| < SMALL_ALPHA, and the derivatives of
    `sepreformer_book.snake._snake_jvp`: d/dx = 1 + sin(2 alpha x), d/dalpha = (x sin(2 alpha x) - ripple) / alpha
    (x^2 on the small branch). torch.sin and torch.cos stand in for the JAX module's reduced polynomials (the same
    function to float32 accuracy; those exist because XLA's CPU sin does not vectorise, ATen's does)."""

    @staticmethod
    def forward(ctx, x, alpha):
        sin_z, ripple = _snake_ripple(x, alpha)
        sin_2z = 2.0 * sin_z * torch.cos(alpha * x)
        ctx.save_for_backward(x, alpha, sin_2z, ripple)
        return x + ripple

    @staticmethod
    def backward(ctx, grad):
        x, alpha, sin_2z, ripple = ctx.saved_tensors
        small = alpha.abs() < SMALL_ALPHA
        inv_alpha = 1.0 / torch.where(small, torch.ones_like(alpha), alpha)
        d_alpha = torch.where(small, x.square(), (x * sin_2z - ripple) * inv_alpha)
        grad_alpha = (grad * d_alpha).reshape(-1, alpha.shape[-1]).sum(0)
        return grad * (1.0 + sin_2z), grad_alpha


class Snake(nn.Module):
    """Snake with one learnable frequency per feature (last axis), alpha initialised to 1."""

    def __init__(self, features: int, init_alpha: float = 1.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((features,), float(init_alpha)))

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad):
            return SnakeFunction.apply(x, self.alpha)
        return x + _snake_ripple(x, self.alpha)[1]  # inference: no derivative terms


# ------------------------------------------------------------------------------------------------------ attention
def rope_tables(num_positions: int, head_size: int, theta: float = ROPE_THETA, device=None):
    """cos and sin (P, d) float32 tables of RoPE in the rotate-half layout, computed in float64 like
    `sepreformer_book.dual_path.rope_tables`."""
    frequencies = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float64, device=device) / head_size)
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float64, device=device), frequencies)
    return angles.cos().repeat(1, 2).float(), angles.sin().repeat(1, 2).float()


def rotate_half(x, cos, sin):
    """x (..., S, d) rotated by the tables (S, d): x cos + (-x2, x1) sin, as Equinox's RoPE."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class RopeAttention(nn.Module):
    """Multi-head self-attention without biases (Equinox's defaults), RoPE on queries and keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_size = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # Equinox's query, key and value projections, stacked
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, key_mask=None):
        """x (B, S, D); key_mask None or bool broadcastable to (B, 1, 1, S): True where a key is a real frame."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, S, d) each
        cos, sin = rope_tables(length, self.head_size, device=x.device)
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # scale 1/sqrt(d), as the JAX model
        return self.out(heads.transpose(1, 2).reshape(batch, length, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + s1 * attention(LN(x)); x + s2 * FF(LN(x)), FF = Linear, Snake, Linear; LayerScale 1e-4."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, layer_scale: float = 1e-4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = RopeAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), Snake(ff_dim), nn.Linear(ff_dim, dim))
        self.scale1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.scale2 = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x, key_mask=None):
        x = x + self.scale1 * self.attn(self.norm1(x), key_mask)
        return x + self.scale2 * self.ff(self.norm2(x))


class DualPathBlock(nn.Module):
    """Intra-chunk then inter-chunk transformer blocks over (B, L, C) frames; the padding of the last chunk is
    masked out as keys (and cut off at the end), as in the JAX block."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, chunk_size: int):
        super().__init__()
        self.intra_block = TransformerBlock(dim, num_heads, ff_dim)
        self.inter_block = TransformerBlock(dim, num_heads, ff_dim)
        self.chunk_size = chunk_size

    def forward(self, x):
        batch, frames, channels = x.shape
        size = self.chunk_size
        chunks = -(-frames // size)
        padding = chunks * size - frames
        intra_mask = inter_mask = None
        if padding:
            valid = (torch.arange(chunks * size, device=x.device) < frames).reshape(chunks, size)
            intra_mask = valid.repeat(batch, 1)[:, None, None, :]  # (B*M, 1, 1, K)
            inter_mask = valid.T.repeat(batch, 1)[:, None, None, :]  # (B*K, 1, 1, M)
        h = F.pad(x, (0, 0, 0, padding)).reshape(batch * chunks, size, channels)
        h = self.intra_block(h, intra_mask)
        h = h.reshape(batch, chunks, size, channels).transpose(1, 2).reshape(batch * size, chunks, channels)
        h = self.inter_block(h, inter_mask)
        h = h.reshape(batch, size, chunks, channels).transpose(1, 2).reshape(batch, chunks * size, channels)
        return h[:, :frames]


class SplitLayer(nn.Module):
    """GLU gate then a linear expansion: (B, L, C) -> (B, N, L, C)."""

    def __init__(self, dim: int, num_stems: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, 2 * dim)
        self.linear2 = nn.Linear(dim, dim * num_stems)
        self.num_stems = num_stems

    def forward(self, x):
        gate, value = self.linear1(x).chunk(2, dim=-1)
        streams = self.linear2(torch.sigmoid(gate) * value)  # (B, L, N*C)
        batch, frames, channels = x.shape
        return streams.view(batch, frames, self.num_stems, channels).permute(0, 2, 1, 3)


class TorchSepReformer(nn.Module):
    """Mixtures (B, T) -> stems (B, N, T): encoder (Conv1d, tanh-GELU), dual-path blocks, split, the same
    reconstruction blocks for every stem, transposed-convolution decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.encoder = nn.Conv1d(1, c.dim, c.kernel_size, stride=c.stride)
        self.decoder = nn.ConvTranspose1d(c.dim, 1, c.kernel_size, stride=c.stride)
        self.split = SplitLayer(c.dim, c.num_stems)
        block = lambda: DualPathBlock(c.dim, c.num_heads, c.ff_dim, c.chunk_size)
        self.sep_blocks = nn.ModuleList([block() for _ in range(c.num_sep_blocks)])
        self.rec_blocks = nn.ModuleList([block() for _ in range(c.num_rec_blocks)])

    def forward(self, mixture):
        batch, samples = mixture.shape
        c = self.config
        padded = padded_length(samples, c.kernel_size, c.stride)
        h = self.encoder(F.pad(mixture, (0, padded - samples))[:, None, :])  # (B, C, L)
        h = F.gelu(h, approximate="tanh").transpose(1, 2)  # jax.nn.gelu's default is the tanh form
        for block in self.sep_blocks:
            h = block(h)
        stems = self.split(h)  # (B, N, L, C)
        frames, channels = stems.shape[2:]
        stems = stems.reshape(batch * c.num_stems, frames, channels)
        for block in self.rec_blocks:
            stems = block(stems)
        waves = self.decoder(stems.transpose(1, 2))  # (B*N, 1, padded)
        return waves.reshape(batch, c.num_stems, -1)[..., :samples]


# ---------------------------------------------------------------------------------------------- JAX <-> torch
def _conv_t_weight(w):
    """eqx.nn.ConvTranspose1d's (out, in, K) kernel as torch's (in, out, K): swap the channel axes, flip time."""
    return np.flip(np.swapaxes(w, 0, 1), axis=-1)


def _block_layout(prefix: str, block) -> dict[str, Callable]:
    """torch name -> function of the JAX TransformerBlock `block` (or its gradient) giving the torch-shaped array."""
    a, ff = block.attn, block.ff.layers
    return {
        f"{prefix}.norm1.weight": lambda: block.norm1.weight, f"{prefix}.norm1.bias": lambda: block.norm1.bias,
        f"{prefix}.attn.qkv.weight": lambda: np.concatenate(
            [np.asarray(p.weight) for p in (a.query_proj, a.key_proj, a.value_proj)]),
        f"{prefix}.attn.out.weight": lambda: a.output_proj.weight,
        f"{prefix}.norm2.weight": lambda: block.norm2.weight, f"{prefix}.norm2.bias": lambda: block.norm2.bias,
        f"{prefix}.ff.0.weight": lambda: ff[0].weight, f"{prefix}.ff.0.bias": lambda: ff[0].bias,
        f"{prefix}.ff.1.alpha": lambda: ff[1].alpha,
        f"{prefix}.ff.2.weight": lambda: ff[2].weight, f"{prefix}.ff.2.bias": lambda: ff[2].bias,
        f"{prefix}.scale1": lambda: block.scale1, f"{prefix}.scale2": lambda: block.scale2,
    }


def jax_layout(tree) -> dict[str, np.ndarray]:
    """The arrays of a JAX SepReformer, or of a pytree shaped like one (its gradient), under the torch port's
    parameter names and in its layouts (float32 NumPy arrays)."""
    getters = {
        "encoder.weight": lambda: tree.encoder.conv.weight, "encoder.bias": lambda: np.ravel(tree.encoder.conv.bias),
        "decoder.weight": lambda: _conv_t_weight(np.asarray(tree.decoder.conv_t.weight)),
        "decoder.bias": lambda: np.ravel(tree.decoder.conv_t.bias),
        "split.linear1.weight": lambda: tree.split.linear1.weight,
        "split.linear1.bias": lambda: tree.split.linear1.bias,
        "split.linear2.weight": lambda: tree.split.linear2.weight,
        "split.linear2.bias": lambda: tree.split.linear2.bias,
    }
    for group in ("sep_blocks", "rec_blocks"):
        for i, dual in enumerate(getattr(tree, group)):
            getters |= _block_layout(f"{group}.{i}.intra_block", dual.intra_block)
            getters |= _block_layout(f"{group}.{i}.inter_block", dual.inter_block)
    return {name: np.array(get(), dtype=np.float32, order="C", copy=True) for name, get in getters.items()}


def load_jax_weights(module: TorchSepReformer, jax_model) -> TorchSepReformer:
    """Copy the weights of the JAX SepReformer `jax_model` into `module` (same config); returns `module`."""
    arrays = jax_layout(jax_model)
    params = dict(module.named_parameters())
    if set(arrays) != set(params):
        raise ValueError(f"parameter names differ: only JAX {sorted(set(arrays) - set(params))}, "
                         f"only torch {sorted(set(params) - set(arrays))}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(param.shape) != arrays[name].shape:
                raise ValueError(f"{name}: torch {tuple(param.shape)} vs JAX {arrays[name].shape}")
            param.copy_(torch.from_numpy(arrays[name]))
    return module


def from_jax(jax_model) -> TorchSepReformer:
    """A torch port of `jax_model` with its weights."""
    return load_jax_weights(TorchSepReformer(jax_model.config), jax_model)


# ---------------------------------------------------------------------------------------------------------- losses
def _energy(x):
    return x.square().sum(-1, keepdim=True)


def si_sdr(estimate, target, *, cap: float | None = None, eps: float = EPS):
    """`sepreformer_book.losses.si_sdr` (zero mean), over the last axis."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    target = target - target.mean(-1, keepdim=True)
    scale = (estimate * target).sum(-1, keepdim=True) / (_energy(target) + eps)
    s_target = scale * target
    ratio = 10.0 * torch.log10((_energy(s_target) + eps) / (_energy(estimate - s_target) + eps))[..., 0]
    return ratio if cap is None else torch.clamp(ratio, max=cap)


def stft_power(x, fft_size: int, hop: int, win_size: int):
    """|STFT|^2 of x (R, T): centred reflect padding, periodic Hann window (centred in the frame): (R, F, K)."""
    window = torch.hann_window(win_size, periodic=True, dtype=x.dtype, device=x.device)
    spectrum = torch.stft(x, fft_size, hop, win_size, window, center=True, pad_mode="reflect", return_complex=True)
    return torch.view_as_real(spectrum).square().sum(-1)


def stft_loss_single(est, tgt, fft_size: int, hop: int, win: int, *, eps: float = EPS):
    """Spectral convergence + mean |log-magnitude difference| per row of est, tgt (R, T): (R,)."""
    est_mag = torch.sqrt(stft_power(est, fft_size, hop, win) + eps)
    tgt_mag = torch.sqrt(stft_power(tgt, fft_size, hop, win) + eps)
    convergence = torch.sqrt((tgt_mag - est_mag).square().sum((-2, -1)) + eps) / torch.sqrt(
        tgt_mag.square().sum((-2, -1)) + eps)
    return convergence + (torch.log(tgt_mag) - torch.log(est_mag)).abs().mean((-2, -1))


def mr_stft_loss(est, tgt, resolutions=STFT_RESOLUTIONS, *, eps: float = EPS):
    return sum(stft_loss_single(est, tgt, *r, eps=eps) for r in resolutions) / len(resolutions)


def silence_penalty(estimate, mixture, *, floor_db: float = -SI_SDR_CAP_DB, eps: float = EPS):
    relative = _energy(estimate)[..., 0] / (_energy(mixture)[..., 0] + eps)
    return 10.0 * torch.log10(relative + 10.0 ** (floor_db / 10.0))


def batch_composite_loss(estimates, targets, active, present=None, *, stft_weight: float = 0.5,
                         cap_db: float = SI_SDR_CAP_DB, resolutions=STFT_RESOLUTIONS):
    """`sepreformer_book.losses.batch_composite_loss`: per item, the mean over present stems of -SI-SDR (capped) +
    0.5 MR-STFT where the stem is active, the silence penalty against the sum of the stems where it is silent,
    nothing where it is absent; then the batch mean. estimates, targets (B, N, T); active, present (B, N) bool."""
    present = torch.ones_like(active) if present is None else present
    sounding, silent = active & present, present & ~active
    batch, stems, samples = estimates.shape
    spectral = mr_stft_loss(estimates.reshape(-1, samples), targets.reshape(-1, samples), resolutions)
    sounding_term = -si_sdr(estimates, targets, cap=cap_db) + stft_weight * spectral.reshape(batch, stems)
    penalty = silence_penalty(estimates, targets.sum(1, keepdim=True), floor_db=-cap_db)
    per_stem = torch.where(sounding, sounding_term, torch.where(silent, penalty, torch.zeros_like(penalty)))
    return (per_stem.sum(1) / present.sum(1).clamp(min=1)).mean()


def stem_si_sdr(estimates, stems, active):
    """SI-SDR per stem averaged over the batch items where it is active (`sepreformer_book.fit.stem_si_sdr`)."""
    values = si_sdr(estimates, stems)
    weights = active.to(values.dtype)
    return (values * weights).sum(0) / weights.sum(0)


# ------------------------------------------------------------------------------------------------------ optimizer
def learning_rate(config: OptimizerConfig, count: int) -> float:
    """`sepreformer_book.fit.learning_rate_schedule(config)(count)`, in plain Python."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if warmup and count < warmup:
        return peak * count / warmup
    if config.decay_steps is None:
        return peak
    span = max(config.decay_steps, warmup + 1) - warmup
    progress = min(count - warmup, span) / span
    return peak * (0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)) + 0.1)


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """`sepreformer_book.fit.decay_mask`: weight decay on leaves named `weight` with two or more axes."""
    return name.rsplit(".", 1)[-1] == "weight" and param.ndim >= 2


class PeerOptimizer:
    """`sepreformer_book.fit.make_optimizer(config)`: clip the gradients to global norm `clip_norm` (optax's rule:
    unchanged below it, g * clip / norm above), then AdamW (betas 0.9, 0.999, eps 1e-8) with decoupled weight decay
    on weight matrices only and the book's schedule, one update per `step()`."""

    def __init__(self, module: nn.Module, config: OptimizerConfig | None = None, *, fused: bool | None = True):
        self.config = OptimizerConfig() if config is None else config
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        groups = [{"params": [p for n, p in named if is_decayed(n, p)], "weight_decay": self.config.weight_decay},
                  {"params": [p for n, p in named if not is_decayed(n, p)], "weight_decay": 0.0}]
        self.adamw = torch.optim.AdamW(groups, lr=learning_rate(self.config, 0), betas=(0.9, 0.999), eps=1e-8,
                                       fused=fused)
        self.count = 0

    def zero_grad(self):
        self.adamw.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Clip, update; returns the global norm of the gradients before clipping."""
        grads = [p.grad for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        clip = self.config.clip_norm
        torch._foreach_mul_(grads, torch.where(norm < clip, torch.ones_like(norm), clip / norm))
        for group in self.adamw.param_groups:
            group["lr"] = learning_rate(self.config, self.count)
        self.adamw.step()
        self.count += 1
        return norm


# --------------------------------------------------------------------------------------------------- training step
def make_train_step(module: TorchSepReformer, optimizer: PeerOptimizer, *, compile: bool = False,
                    compile_mode: str | None = None) -> Callable[[dict], dict]:
    """One training step, as `sepreformer_book.fit.step`: loss and gradients of the batch, clip + AdamW update;
    returns {"loss", "si_sdr", "grad_norm"}. With compile=True the forward pass and loss (and so their backward
    pass, through AOTAutograd) run through torch.compile; the optimizer is torch's fused CPU AdamW either way."""

    def forward_loss(mixture, stems, active, present):
        estimates = module(mixture)
        loss = batch_composite_loss(estimates, stems, active, present)
        return loss, stem_si_sdr(estimates.detach(), stems, active)

    if compile:
        forward_loss = torch.compile(forward_loss, mode=compile_mode, dynamic=False)

    def train_step(batch: dict) -> dict:
        optimizer.zero_grad()
        loss, per_stem = forward_loss(batch["mixture"], batch["stems"], batch["active"], batch["present"])
        loss.backward()
        grad_norm = optimizer.step()
        return {"loss": loss.detach(), "si_sdr": per_stem, "grad_norm": grad_norm}

    return train_step


def torch_batch(batch: dict) -> dict:
    """A NumPy batch (mixture, stems, active, present) as torch tensors sharing its memory."""
    return {k: torch.from_numpy(np.ascontiguousarray(batch[k])) for k in ("mixture", "stems", "active", "present")}


# ----------------------------------------------------------------------------------------------------- inference
def separate_long(forward: Callable, mixture: np.ndarray, *, window_samples: int, overlap_samples: int,
                  batch_windows: int) -> np.ndarray:
    """`sepreformer_book.inference.separate_long` with a torch forward (B, W) -> (B, N, W): the same window starts,
    batches of `batch_windows` (silent rows fill the last), the same normalised cross-fade overlap-add."""
    window, batch = int(window_samples), int(batch_windows)
    weights = crossfade_weights(window, overlap_samples)
    mixture = np.asarray(mixture, dtype=np.float32)
    num_samples = mixture.shape[0]
    starts = window_starts(num_samples, window, overlap_samples)
    padded = np.zeros(int(starts[-1]) + window, dtype=np.float32)
    padded[:num_samples] = mixture
    weight_sum = np.zeros(padded.size)
    for start in starts:
        weight_sum[start:start + window] += weights
    accumulated = None
    with torch.inference_mode():
        for first in range(0, len(starts), batch):
            batch_starts = starts[first:first + batch]
            windows = np.zeros((batch, window), dtype=np.float32)
            for row, start in enumerate(batch_starts):
                windows[row] = padded[start:start + window]
            estimates = forward(torch.from_numpy(windows)).numpy()
            if accumulated is None:
                accumulated = np.zeros((estimates.shape[1], padded.size))
            for row, start in enumerate(batch_starts):
                accumulated[:, start:start + window] += weights * estimates[row]
    return (accumulated[:, :num_samples] / weight_sum[:num_samples]).astype(np.float32)
