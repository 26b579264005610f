"""Key mapping as tables: each ``Rule`` names one of our parameters, the PyTorch tensor it comes from, and the
transforms between the two layouts. ``import_params`` / ``export_params`` apply a table and report every
missing, unexpected or mis-shaped key at once.

Names use ``{i}`` for a layer index, e.g. ``Rule("blocks.{i}.attn.proj.kernel", "blocks.{i}.attn.proj.weight",
linear)``. Our names are the dotted paths of the model's pure-dict parameter tree.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np
from flax import traverse_util

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(x: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) <-> our kernel (in, out)."""
    return x.T


def patch_conv(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, h, w) -> our kernel (h, w, in, out)."""
    return x.transpose(2, 3, 1, 0)


def patch_conv_back(x: np.ndarray) -> np.ndarray:
    """our kernel (h, w, in, out) -> torch Conv2d weight (out, in, h, w)."""
    return x.transpose(3, 2, 0, 1)


def take_third(index: int) -> Transform:
    """One of q, k, v out of a fused (3 * d, ...) qkv weight or bias, then as ``linear`` for 2-D weights."""

    def transform(x: np.ndarray) -> np.ndarray:
        part = np.split(x, 3, axis=0)[index]
        return part.T if part.ndim == 2 else part

    return transform


@dataclasses.dataclass(frozen=True)
class Rule:
    """Our parameter ``ours`` <- PyTorch tensor ``theirs`` via ``to_ours``; ``to_theirs`` inverts it (export)."""

    ours: str
    theirs: str
    to_ours: Transform = identity
    to_theirs: Transform | None = identity


def flatten(params: Mapping) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """Dotted names back to the nested pure dict (integer path parts become int keys, as nnx uses)."""
    return traverse_util.unflatten_dict({tuple(int(p) if p.isdigit() else p for p in k.split(".")): v
                                         for k, v in flat.items()})


def expand(rules: list[Rule], layers: Mapping[str, int]) -> list[Rule]:
    """Rules with ``{i}`` repeated for every layer; ``layers`` maps a rule prefix (e.g. "blocks") to its count."""
    out = []
    for rule in rules:
        if "{i}" not in rule.ours:
            out.append(rule)
            continue
        prefix = rule.ours.split(".{i}", 1)[0]
        out += [dataclasses.replace(rule, ours=rule.ours.format(i=i), theirs=rule.theirs.format(i=i))
                for i in range(layers[prefix])]
    return out


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message lists every offending name and shape."""


def import_params(source: Mapping[str, np.ndarray], rules: list[Rule], target: Mapping[str, tuple[int, ...]],
                  what: str, ignore: tuple[str, ...] = ()) -> dict:
    """Our parameter tree from ``source`` (PyTorch names) through expanded ``rules``.

    ``target``: our dotted name -> expected shape (every one must be produced); ``ignore``: regexes of source
    names that are allowed to be left unused (e.g. buffers).
    """
    missing = sorted({r.theirs for r in rules if r.theirs not in source})
    used = {r.theirs for r in rules}
    unexpected = sorted(k for k in source if k not in used and not any(re.fullmatch(p, k) for p in ignore))
    out, bad_shapes = {}, []
    for rule in rules:
        if rule.theirs not in source:
            continue
        value = np.asarray(rule.to_ours(source[rule.theirs]), np.float32)
        expected = target.get(rule.ours)
        if expected is not None and tuple(value.shape) != tuple(expected):
            bad_shapes.append(f"{rule.theirs} {tuple(source[rule.theirs].shape)} -> {rule.ours} "
                              f"{tuple(value.shape)}, expected {tuple(expected)}")
        out[rule.ours] = value
    not_produced = sorted(set(target) - set(out) - {r.ours for r in rules if r.theirs in missing})
    problems = [(f"missing in the checkpoint: {missing}" if missing else ""),
                (f"unexpected in the checkpoint: {unexpected}" if unexpected else ""),
                (f"shape mismatches: {bad_shapes}" if bad_shapes else ""),
                (f"no source for our parameters: {not_produced}" if not_produced else "")]
    problems = [p for p in problems if p]
    if problems:
        raise ConversionError(f"{what}: the checkpoint does not fit the model; " + "; ".join(problems))
    return unflatten(out)


def export_params(params: Mapping, rules: list[Rule], what: str) -> dict[str, np.ndarray]:
    """PyTorch-named tensors from our parameter tree through expanded ``rules`` (each must be invertible)."""
    flat = flatten(params)
    missing = sorted(r.ours for r in rules if r.ours not in flat)
    unexpected = sorted(set(flat) - {r.ours for r in rules})
    if missing or unexpected:
        raise ConversionError(f"{what}: the parameters do not fit the export table; missing {missing}, "
                              f"unexpected {unexpected}")
    out = {}
    for rule in rules:
        if rule.to_theirs is None:
            raise ConversionError(f"{what}: {rule.ours} cannot be exported (no inverse transform)")
        out[rule.theirs] = np.ascontiguousarray(rule.to_theirs(np.asarray(flat[rule.ours], np.float32)))
    return out
