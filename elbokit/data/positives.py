"""Positive pairs (x, x+) by augmentation: `elbokit train --positives SPEC`, `data.positives`.

The InfoNCE term's `dot` and `cosine` critics score a code against the code of a positive x+
of the same example. The paper's synthetic data carry their positives (x + N(0, radius^2),
drawn once with the data); any other data can get them from an augmentation, drawn afresh for
every training minibatch. SPEC is one or more items joined by `+`, applied left to right:

- `gaussian:RADIUS`: x+ = x + N(0, RADIUS^2), independently for every value: the paper's
  positives. RADIUS is in the data's ORIGINAL units (as in the file, before standardisation),
  the units of `--radius` of the synthetic datasets; with standardisation on, the model sees
  noise of std RADIUS / std_d in feature d.
- `shift:PIXELS` (or `shift:PIXELS:edge`): translate each image by (dy, dx), each drawn
  uniformly from {-PIXELS, ..., PIXELS}, independently per example. Content moved out of the
  frame is lost; the uncovered border is 0 in original units (`zero`, the default: the
  background of digits and most image files) or a copy of the nearest edge pixel (`edge`).
- `flip` (or `flip:PROB`): mirror each image left-right (the last axis) with probability PROB
  (default 0.5).

`shift` and `flip` need image-shaped data, (N, C, H, W) or (N, H, W); `gaussian` takes any
shape. Positives are not clipped to the data's range: only the encoder sees them.

Reproducibility: the positives of training step s (counted over the whole run) come from a
`torch.Generator` seeded with (train.seed, s) alone, so a resumed run, even one stopped in the
middle of an epoch, draws exactly the positives of an uninterrupted one, and several processes
(which draw for the global batch, then keep their rows) draw the same as one. The validation
and test splits get one fixed draw each, from (data.seed, split), so that validation is
deterministic; the training split gets one too (used by the checks before a run starts). A
streamed split (a data file read from disk a minibatch at a time) is never held whole: its
fixed positives are drawn per request, from (data.seed, split, first row, rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from elbokit.errors import ElbokitError

SPEC_HELP = "gaussian:RADIUS, shift:PIXELS[:zero|edge] or flip[:PROB], joined by + (e.g. shift:1+flip)"
PADDINGS = ("zero", "edge")


@dataclass(frozen=True)
class Augmentation:
    """One item of a spec: kind 'gaussian' (amount = radius), 'shift' (amount = pixels,
    padding 'zero' or 'edge') or 'flip' (amount = probability)."""

    kind: str
    amount: float
    padding: str = "zero"

    @property
    def needs_image(self) -> bool:
        return self.kind in ("shift", "flip")

    def __str__(self) -> str:
        if self.kind == "gaussian":
            return f"gaussian:{self.amount:g}"
        if self.kind == "shift":
            return f"shift:{int(self.amount)}" + (":edge" if self.padding == "edge" else "")
        return "flip" if self.amount == 0.5 else f"flip:{self.amount:g}"


def _bad(spec: str, why: str) -> ElbokitError:
    return ElbokitError(f"data.positives (--positives) '{spec}': {why}; give {SPEC_HELP}.")


def _number(spec: str, item: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(spec, f"'{item}' needs a number after the colon, got '{text}'") from None
    if not math.isfinite(value):
        raise _bad(spec, f"'{item}' needs a finite number")
    return value


def parse(spec: str) -> tuple[Augmentation, ...]:
    """The items of `spec`, checked; raises ElbokitError (one line) for a bad spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "the spec is empty")
    items = []
    for item in spec.replace(" ", "").split("+"):
        kind, _, rest = item.partition(":")
        args = rest.split(":") if rest else []
        if kind == "gaussian":
            if len(args) != 1:
                raise _bad(spec, "gaussian takes one number, the noise std in data units (gaussian:0.1)")
            radius = _number(spec, item, args[0])
            if radius <= 0:
                raise _bad(spec, f"the gaussian radius must be positive, got {args[0]}")
            items.append(Augmentation("gaussian", radius))
        elif kind == "shift":
            if len(args) not in (1, 2):
                raise _bad(spec, "shift takes the largest shift in pixels and optionally the padding (shift:2 or shift:2:edge)")
            pixels = _number(spec, item, args[0])
            if pixels != int(pixels) or pixels < 1:
                raise _bad(spec, f"the shift must be a whole number of pixels, at least 1, got {args[0]}")
            padding = args[1] if len(args) == 2 else "zero"
            if padding not in PADDINGS:
                raise _bad(spec, f"the shift's padding must be zero or edge, got '{padding}'")
            items.append(Augmentation("shift", int(pixels), padding))
        elif kind == "flip":
            if len(args) > 1:
                raise _bad(spec, "flip takes at most one number, the probability (flip or flip:0.5)")
            prob = _number(spec, item, args[0]) if args else 0.5
            if not 0 < prob <= 1:
                raise _bad(spec, f"the flip probability must be in (0, 1], got {args[0]}")
            items.append(Augmentation("flip", prob))
        else:
            raise _bad(spec, f"unknown augmentation '{kind or item}'")
    return tuple(items)


def normalize(spec: str) -> str:
    """The canonical text of a spec (what config.toml records): `shift:1:zero+flip:0.5` -> `shift:1+flip`."""
    return "+".join(str(a) for a in parse(spec))


def check_shape(augmentations: tuple[Augmentation, ...], event_shape: tuple[int, ...], spec: str) -> None:
    """Refuse image augmentations on vectors, and shifts as large as the image."""
    for a in augmentations:
        if a.needs_image and len(event_shape) < 2:
            raise ElbokitError(
                f"data.positives (--positives) '{spec}': {a.kind} needs image-shaped data, (N, C, H, W) or (N, H, W), "
                f"but each example here has shape {tuple(event_shape)}; use gaussian:RADIUS for vectors.")
        if a.kind == "shift" and a.amount >= min(event_shape[-2:]):
            raise ElbokitError(
                f"data.positives (--positives) '{spec}': a shift of up to {int(a.amount)} pixels would move the whole "
                f"{event_shape[-2]} x {event_shape[-1]} image out of the frame; give fewer pixels.")


# -- the augmentations, on tensors in original units ---------------------------------------
def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, padding: str = "zero") -> torch.Tensor:
    """Translate example b of x (B, ..., H, W) by dy[b] rows down and dx[b] columns right
    (negative: up, left): out[b, ..., y, x] = x[b, ..., y - dy[b], x - dx[b]], and where that
    falls outside the image, 0 (`zero`) or the nearest edge pixel (`edge`). |dy|, |dx| < H, W."""
    import torch.nn.functional as F

    # By hand: torch has no per-example integer translation (torch.roll wraps around and shifts
    # the whole batch alike; torchvision, not a dependency, draws one transform per call).
    B, H, W = x.shape[0], x.shape[-2], x.shape[-1]
    p = int(max(int(dy.abs().max()), int(dx.abs().max()), 0)) if B else 0
    x4 = x.reshape(B, -1, H, W)
    # F.pad pads the last two axes of a 4-D tensor: a constant 0, or "replicate" for edge.
    padded = F.pad(x4, (p, p, p, p), mode="replicate") if padding == "edge" else F.pad(x4, (p, p, p, p))
    dev = x.device
    rows = torch.arange(H, device=dev) + p - dy.to(dev)[:, None]  # (B, H): the padded row each output row reads
    cols = torch.arange(W, device=dev) + p - dx.to(dev)[:, None]  # (B, W)
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(x4.shape[1], device=dev)[None, :, None, None]
    out = padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]
    return out.reshape(x.shape)


def flip_images(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror the images of x (B, ..., H, W) left-right; with `mask` (B,) bool, only those rows."""
    flipped = x.flip(-1)
    if mask is None:
        return flipped
    return torch.where(mask.to(x.device).reshape(-1, *([1] * (x.ndim - 1))), flipped, x)


def apply(augmentations: tuple[Augmentation, ...], x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x+ of a batch x (B, *event_shape) in original units; every random number is drawn on the
    CPU from `generator` (the same numbers on any device), in the order of the items."""
    B = x.shape[0]
    out = x
    for a in augmentations:
        if a.kind == "gaussian":
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            out = out + a.amount * noise.to(x.device)
        elif a.kind == "shift":
            k = int(a.amount)
            dy = torch.randint(-k, k + 1, (B,), generator=generator)
            dx = torch.randint(-k, k + 1, (B,), generator=generator)
            out = shift_images(out, dy, dx, a.padding)
        else:
            mask = torch.rand(B, generator=generator) < a.amount
            out = flip_images(out, mask)
    return out


def _generator(*stream: int) -> torch.Generator:
    # numpy's SeedSequence hashes the tuple (seed, purpose, index) into well-mixed, independent
    # streams; torch has no such hashing, so the seed of the torch.Generator comes from it.
    words = np.random.SeedSequence([int(s) % (2**63) for s in stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)


POSITIVES_STREAM = 17  # the purpose tag of the positives' streams: (seed, 17, index)
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


class PositiveSampler:
    """Draws positives for batches of the tensors the model sees (standardised when the run
    standardises): each batch is mapped back to original units, augmented, and mapped forward
    again, so that `gaussian` is in data units and `shift` pads with a data-unit 0."""

    def __init__(self, spec: str, event_shape: tuple[int, ...], standardizer: Any = None, seed: int = 0):
        self.augmentations = parse(spec)
        self.spec = "+".join(str(a) for a in self.augmentations)
        check_shape(self.augmentations, tuple(event_shape), spec)
        self.seed = int(seed)
        self.offset = self.scale = None
        if standardizer is not None:
            # x_model = offset + scale * x_original, read off the standardiser's own transform
            # (whatever its layout: per feature, per channel or none).
            zeros = np.zeros((1, *event_shape))
            offset = np.asarray(standardizer.transform(zeros), dtype=np.float64)
            scale = np.asarray(standardizer.transform(zeros + 1.0), dtype=np.float64) - offset
            if not (np.all(offset == 0) and np.all(scale == 1)):
                self.offset = torch.as_tensor(offset, dtype=torch.float32)
                self.scale = torch.as_tensor(scale, dtype=torch.float32)

    def _draw(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.offset is None:
            return apply(self.augmentations, x, generator)
        offset, scale = self.offset.to(x.device), self.scale.to(x.device)
        original = (x - offset) / scale
        return offset + scale * apply(self.augmentations, original, generator)

    @torch.no_grad()
    def draw(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Fresh positives of the training batch x at training step `step` (from 0, over the
        whole run), from the stream (train.seed, step) alone."""
        return self._draw(x, _generator(self.seed, POSITIVES_STREAM, int(step)))

    @torch.no_grad()
    def fixed(self, x: torch.Tensor, split: str, data_seed: int) -> torch.Tensor:
        """One fixed draw for a whole split, from the stream (data.seed, split)."""
        return self._draw(x, _generator(int(data_seed), POSITIVES_STREAM, 1000 + SPLIT_STREAMS.get(split, 3)))

    def describe(self) -> dict[str, Any]:
        return {"source": "augmentation", "spec": self.spec,
                "units": "original data units (gaussian radius; zero padding is 0 there)",
                "fresh": "every training step, from (train.seed, step); validation and test: one fixed draw"}


class DrawnPositives:
    """The positives of a streamed split (whose `.x` is read from disk a minibatch at a time),
    drawn when indexed instead of held whole: rows `index` of x, augmented with a generator
    seeded from (data.seed, split, the first row asked for, the number of rows), so that the
    same request (validation's fixed chunks, the checks' first rows) gets the same positives."""

    def __init__(self, x: Any, sampler: "PositiveSampler", split: str, data_seed: int):
        self.x, self.sampler, self.split, self.data_seed = x, sampler, split, int(data_seed)
        self.shape, self.device, self.dtype = x.shape, x.device, x.dtype

    ndim = property(lambda self: len(self.shape))

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows = self.x[index]
        if isinstance(index, slice):
            first = index.start or 0
        else:
            flat = torch.as_tensor(index).reshape(-1)
            first = int(flat[0]) if len(flat) else 0
        generator = _generator(self.data_seed, POSITIVES_STREAM, 1000 + SPLIT_STREAMS.get(self.split, 3),
                               first, int(rows.shape[0]))
        with torch.no_grad():
            return self.sampler._draw(rows, generator)


def positives_of_split(sampler: "PositiveSampler", split: Any, name: str, data_seed: int) -> Any:
    """A split's fixed positives: one draw of the whole split held as a tensor, or for a streamed
    split (not a tensor) a `DrawnPositives` view that draws the rows asked for."""
    if isinstance(split.x, torch.Tensor):
        return sampler.fixed(split.x, name, data_seed)
    return DrawnPositives(split.x, sampler, name, data_seed)


def describe(cfg: dict[str, Any], dataset: Any, sampler: PositiveSampler | None, used: bool) -> dict[str, Any]:
    """What a run's positives are, for its summary: an augmentation, the dataset's own, or none."""
    if sampler is not None:
        out = sampler.describe()
    elif getattr(dataset, "x_pos", None) is not None:
        out = {"source": "dataset"}
        if "radius" in getattr(dataset, "meta", {}):
            out["radius"] = float(dataset.meta["radius"])
    else:
        out = {"source": "none"}
    out["used"] = bool(used)
    return out
