"""Key mapping as tables: each ``Rule`` names one of our parameters, the PyTorch tensor it comes from, and the
transforms between the two layouts. ``import_params`` / ``export_params`` apply a table and report every
missing, unexpected or mis-shaped key at once.

Names use ``{i}`` for a layer index, e.g. ``Rule("blocks.{i}.attn.proj.kernel", "blocks.{i}.attn.proj.weight",
linear)``. Our names are the dotted paths of the model's pure-dict parameter tree, seen per layer: our models
stack their layers (``blocks.attn.proj.kernel`` of shape (depth, ...)), and ``stack`` / ``unstack`` turn that
layout into ``blocks.{i}.attn.proj.kernel`` and back, so the tables and size checks are written per layer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np
from flax import traverse_util

from cab_jax.errors import UserError

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


def norm_rules(ours: str, theirs: str) -> list[Rule]:
    """A LayerNorm: our scale and bias <- PyTorch weight and bias."""
    return [Rule(f"{ours}.scale", f"{theirs}.weight"), Rule(f"{ours}.bias", f"{theirs}.bias")]


def dense_rules(ours: str, theirs: str) -> list[Rule]:
    """A Linear with bias: our (in, out) kernel and bias <- PyTorch (out, in) weight and bias."""
    return [Rule(f"{ours}.kernel", f"{theirs}.weight", linear, linear), Rule(f"{ours}.bias", f"{theirs}.bias")]


def flatten(params: Mapping) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """Dotted names back to the nested pure dict (integer path parts become int keys, as nnx uses)."""
    return traverse_util.unflatten_dict({tuple(int(p) if p.isdigit() else p for p in k.split(".")): v
                                         for k, v in flat.items()})


def _layer_name(name: str, prefixes: tuple[str, ...]) -> tuple[str, str] | None:
    """(prefix, rest) when ``name`` is "prefix.rest" for one of the stacked ``prefixes``."""
    for prefix in prefixes:
        if name.startswith(prefix + "."):
            return prefix, name[len(prefix) + 1 :]
    return None


def unstack(flat: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Stacked parameters ``prefix.rest`` (leading axis: layers) as per-layer ``prefix.{i}.rest``."""
    out = {}
    for name, value in flat.items():
        split = _layer_name(name, prefixes)
        if split is None:
            out[name] = value
            continue
        for i in range(np.shape(value)[0]):
            out[f"{split[0]}.{i}.{split[1]}"] = value[i]
    return out


def unstack_shapes(shapes: Mapping[str, tuple[int, ...]], prefixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``unstack`` for a dotted name -> shape table."""
    out = {}
    for name, shape in shapes.items():
        split = _layer_name(name, prefixes)
        if split is None:
            out[name] = tuple(shape)
        else:
            out.update({f"{split[0]}.{i}.{split[1]}": tuple(shape[1:]) for i in range(shape[0])})
    return out


def stack(flat: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-layer parameters ``prefix.{i}.rest`` stacked into ``prefix.rest`` (layer i at index i)."""
    out, layers = {}, {}
    for name, value in flat.items():
        split = _layer_name(name, prefixes)
        index, _, rest = split[1].partition(".") if split else ("", "", "")
        if split is None or not index.isdigit():
            out[name] = value
        else:
            layers.setdefault(f"{split[0]}.{rest}", {})[int(index)] = value
    for name, per_layer in layers.items():
        if sorted(per_layer) != list(range(len(per_layer))):
            raise ConversionError(f"{name}: layers {sorted(per_layer)} are not 0..{len(per_layer) - 1}")
        out[name] = np.stack([per_layer[i] for i in range(len(per_layer))])
    return out


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


class ConversionError(UserError, ValueError):
    """A checkpoint that does not fit the model; the message lists every offending name and shape."""


def import_params(source: Mapping[str, np.ndarray], rules: list[Rule], target: Mapping[str, tuple[int, ...]],
                  what: str, ignore: tuple[str, ...] = (), stacked: tuple[str, ...] = ()) -> dict:
    """Our parameter tree from ``source`` (PyTorch names) through expanded ``rules``, with the layers under the
    ``stacked`` prefixes stacked as our models hold them.

    ``target``: our per-layer dotted name -> expected shape (every one must be produced; ``unstack_shapes`` of
    the model's); ``ignore``: regexes of source names that are allowed to be left unused (e.g. buffers).
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
    return unflatten(stack(out, stacked))


def export_params(params: Mapping, rules: list[Rule], what: str, stacked: tuple[str, ...] = ()
                  ) -> dict[str, np.ndarray]:
    """PyTorch-named tensors from our parameter tree (layers under the ``stacked`` prefixes stacked) through
    expanded ``rules`` (each must be invertible)."""
    flat = unstack(flatten(params), stacked)
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
