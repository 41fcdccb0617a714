"""An attention layer's inner channel groups: q with k, v with the output projection's inputs, heads as blocks.

    groups = head_groups(spec, order)            # the "dot" layout, plain attention's
    groups = relaid(groups, {"blocks.0.attn": "cross"})   # a layer's groups rebuilt in another of LAYOUTS

Which layout a model's layer needs is found by the exactness check (`otfuse.grouping.exact`).
"""

from __future__ import annotations

import torch

from otfuse.grouping.attention import Attention
from otfuse.grouping.group import ChannelGroup, Member, Observation

# How an attention layer's channels pair up, tried in this order until the exactness check holds (`relaid`):
# "dot": q with k (softmax(q k^T) v), v with the output; "cross": q with the output, k with v (XCiT's attention over
# channels, softmax(q^T k) applied to v); "rotary": q and k stay in place within a head (a rotary embedding turns
# fixed channel pairs), whole heads still move; "pinned": heads stay in place (a per-head tensor outside the layer,
# shared by several layers), channels move within them; "rotary-pinned": both.
LAYOUTS = ("dot", "cross", "rotary", "pinned", "rotary-pinned")


def head_groups(spec: Attention, order: dict[str, int], layout: str = "dot") -> list[ChannelGroup]:
    """An attention layer's two inner groups, heads as blocks of one family. In the "dot" layout `<name>:qk` holds
    the q and k channels (one permutation for both) and the per-head tensors, `<name>:v` the v channels and the output
    projection's inputs; the other LAYOUTS pair them as they say."""
    c = torch.arange(spec.width)
    head = c // spec.head_dim
    kind = lambda module: "layer" if module in spec.layers else "other"
    rotary = layout.startswith("rotary")
    # a rotary layout's q/k group has one channel per head: the head's channels, in place
    unit = (lambda i: i.reshape(spec.heads, -1)) if rotary else (lambda i: i)

    def members(parts: list, role: str, fold=lambda i: i) -> list[Member]:
        by_slot: dict[tuple, list[torch.Tensor]] = {}
        for slot, offset in parts:
            by_slot.setdefault(slot, []).append(c + offset)
        return [Member(n, t, a, fold(torch.stack(cols, 1)), role, kind(n)) for (n, t, a), cols in by_slot.items()]

    def seen(points: list, foldable: bool, fold=lambda i: i) -> list[Observation]:
        return [
            Observation(n, fold(torch.stack([c + o for o in offsets], 1)), on, -1, through, foldable and not through[0])
            for n, on, offsets, through in points
        ]

    first = order.get(spec.name, min((order.get(n, 1 << 30) for n in spec.layers), default=1 << 30))
    per_head = lambda index: [Member(n, t, a, index, "out", "other") for n, t, a in spec.per_head]
    mixed = [Member(n, t, a, c[:, None], "in", kind(n)) for n, t, a in spec.mixed]
    seen_v = seen(spec.seen_v, True)
    if layout == "cross":
        q_seen, k_seen = _split_qk(spec.seen_qk)
        a = ChannelGroup(f"{spec.name}:q", spec.width, members(spec.q, "out") + mixed + per_head(head[:, None]), order=first)
        a.observations, a.pre_observations = [o for o in seen_v if o.on == "input"], seen(q_seen, False)
        b = ChannelGroup(f"{spec.name}:kv", spec.width, members(spec.k + spec.v, "out"), order=first)
        b.pre_observations = seen(k_seen, False) + [o for o in seen_v if o.on == "output"]
    else:
        heads = torch.arange(spec.heads) if rotary else head
        a = ChannelGroup(
            f"{spec.name}:qk",
            spec.heads if rotary else spec.width,
            members(spec.q + spec.k, "out", unit) + per_head(heads[:, None]),
            pre_observations=seen(spec.seen_qk, False, unit),
            order=first,
        )
        b = ChannelGroup(
            f"{spec.name}:v",
            spec.width,
            members(spec.v, "out") + mixed,
            observations=[o for o in seen_v if o.on == "input"],
            pre_observations=[o for o in seen_v if o.on == "output"],
            order=first,
        )
        a.blocks = heads.clone()
    if layout == "cross":
        a.blocks = head.clone()
    b.blocks = head.clone()
    for g in (a, b):
        g.family, g.pinned, g.attention, g.layout = f"{spec.name}:heads", layout.endswith("pinned"), spec, layout
    return [a, b] + [_inner_group(spec, k, first) for k in range(len(spec.inner))]


def _inner_group(spec: Attention, k: int, order: int) -> ChannelGroup:
    """The k-th group of channels inside an attention layer that belong to no head (a reduction of the keys' input)."""
    size, slots, (module, on, axis) = spec.inner[k]
    c = torch.arange(size)[:, None]
    members = [Member(n, t, a, c, role, kind) for (n, t, a), role, kind in slots]
    g = ChannelGroup(f"{spec.name}:inner{k}", size, members, [Observation(module, c, on, axis)], order=order)
    g.attention = spec
    return g


def _split_qk(points: list) -> tuple[list, list]:
    """Where q and where k can be read, apart: a point with two offsets holds both (q first), single points alternate."""
    if all(len(offsets) == 2 for _, _, offsets, _ in points):
        return [(n, on, offsets[:1], t) for n, on, offsets, t in points], [(n, on, offsets[1:], t) for n, on, offsets, t in points]
    return points[0::2], points[1::2]


def relaid(groups: list[ChannelGroup], layouts: dict[str, str]) -> list[ChannelGroup]:
    """`groups` with each named attention layer's inner groups rebuilt in the given layout (one of LAYOUTS); the new
    groups keep the old ones' place in the forward order and their family (blocks linked beyond the layer)."""
    if not layouts:
        return groups
    out: list[ChannelGroup] = []
    done: set[str] = set()
    for g in groups:
        spec = g.attention
        if spec is None or spec.name not in layouts:
            out.append(g)
            continue
        if spec.name in done:
            continue
        done.add(spec.name)
        new = head_groups(spec, {spec.name: g.order}, layouts[spec.name])  # the inner groups (layout "") come back as they were
        for h in (h for h in new if h.blocks is not None):
            h.family, h.pinned = g.family, h.pinned or g.pinned
        out += new
    if any(layout.endswith("pinned") for layout in layouts.values()):  # a pinned family's every group keeps its blocks
        pinned = {g.family for g in out if g.pinned}
        for g in out:
            g.pinned = g.pinned or (g.family in pinned and g.blocks is not None)
    return sorted(out, key=lambda g: (g.order, g.name))  # find_groups' order: two models' lists pair up by position
