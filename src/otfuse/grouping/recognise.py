"""Recognisers: what an op of the traced graph does to the channels, where Torch-Pruning 1.6 gets it wrong.

    repair_index_maps(graph, tokens)       # splits, concatenations, pixel shuffles, stacked paths, channel units, broadcasts
    last, mixing = cut_token_mixing(graph) # token-mixing regions taken out of the channels' graph
    maps = channel_first_maps(model, x)    # learned (1, C, H, W) maps whose channels are on dim 1

Each recogniser reads the autograd graph behind a DepGraph node and writes the index map the op defines, both
through `otfuse.grouping.adapter` (which alone knows Torch-Pruning's and autograd's private names).
"""

from __future__ import annotations

import torch
from torch import nn

from otfuse.grouping import adapter
from otfuse.grouping.adapter import ChannelBlocks, PathSum, input_shapes, op_type, output_shape, saved, saved_sizes, signed, view_sizes


def repair_index_maps(graph, tokens: bool = False) -> None:
    """Torch-Pruning's index maps, with those of splits and concatenations along channels redone from the autograd
    graph. Torch-Pruning 1.6 pairs a split's outputs and a concatenation's inputs with offsets in the order it
    found them (a split's parts land on the wrong consumers), sizes a chunk's parts by guessing, and drops a
    concatenation's offsets when a slice follows it. Where the autograd graph is ambiguous (one op reading two
    parts of one split, a concatenation of a constant or of one tensor twice) Torch-Pruning's maps stand and the
    exactness check guards them."""
    adapter.update_index_maps(graph)
    for node in graph.module2node.values():
        fn = node.grad_fn
        dim = None if fn is None else _channel_dim(fn, tokens)
        if dim is None:
            continue
        if op_type(node) == "split":
            offsets = _offsets([sh[dim] for sh in input_shapes(fn)])
            for out in node.outputs:
                nrs = [i for f, i in getattr(out.grad_fn, "next_functions", ()) if f is fn]
                if len(nrs) == 1:
                    adapter.set_offsets(node, out, 0, "split", offsets[nrs[0] : nrs[0] + 2])
        elif op_type(node) == "concat":
            producers = [f for f, _ in fn.next_functions]
            if None in producers or len({id(f) for f in producers}) != len(producers):
                continue
            offsets = _offsets([int(output_shape(f, i)[dim]) for f, i in fn.next_functions])
            for k, f in enumerate(producers):
                for inp in [n for n in node.inputs if n.grad_fn is f]:
                    adapter.set_offsets(inp, node, 1, "concat", offsets[k : k + 2])
    for node in graph.module2node.values():
        _map_pixel_shuffle(node)
        _map_paths(node)
        if tokens and (_joins_tokens(node) or _slices_space(node)):
            adapter.set_identity(node)
        elif tokens:
            _map_merge_into_channels(node)
    for node in graph.module2node.values():
        _map_channel_units(node)  # after the views it reads were mapped
        _cut_broadcast(node)
        _cut_pooling_weights(node)
    adapter.concat_before_split(graph)


def _channel_dim(fn, tokens: bool) -> int | None:
    """The dim a split or concatenation acts on when it is the channels' (None otherwise): dim 1, or in a model with
    attention layers the last dim of a channels-last tensor (Swin's patch merging joins four slices there)."""
    dim = saved(fn, "dim")
    if not isinstance(dim, int):
        return None
    dim = signed(dim)
    if dim == 1:
        return 1
    shapes = input_shapes(fn)
    ndim = len(shapes[0]) if shapes else 0
    return dim % ndim if tokens and ndim >= 3 and dim % ndim == ndim - 1 else None


def _joins_tokens(node) -> bool:
    """A concatenation of (batch, tokens, channels) tensors along a dim before the channels."""
    fn = node.grad_fn
    if op_type(node) != "concat" or fn is None or not input_shapes(fn):
        return False
    ndim = len(input_shapes(fn)[0])
    return ndim == 3 and saved(fn, "dim", -1) % ndim != ndim - 1


def _slices_space(node) -> bool:
    """A slice of a channels-last (batch, height, width, channels) map along height or width (Swin's patch merging
    takes every other row and column), which Torch-Pruning 1.6 takes for a slice of channels on dim 1."""
    fn = node.grad_fn
    if op_type(node) != "slice" or fn is None:
        return False
    sizes, dim = saved_sizes(fn), saved(fn, "dim")
    return len(sizes) == 4 and dim in (1, 2) and sizes[1] == sizes[2] != sizes[3]


def _map_merge_into_channels(node) -> None:
    """A reshape of a channels-last map (..., a, b, C) -> (..., a * b * C) (timm's Swin patch merging folds each 2 x 2
    neighbourhood into the channels): channel c becomes positions k * C + c, which Torch-Pruning 1.6 maps as c. Two
    dims or more are folded: one folded dim is an attention layer's heads joined inside it, which is not the stream's."""
    fn = node.grad_fn
    if op_type(node) != "reshape" or fn is None or not input_shapes(fn):
        return
    before = saved_sizes(fn)
    after = tuple(int(v) for v in input_shapes(fn)[0])
    if len(before) < len(after) + 2 or len(after) < 2 or before[: len(after) - 1] != after[:-1] or after[-1] % before[-1]:
        return
    if min(before[len(after) - 1 :]) == 1:  # a flatten of (N, C, 1, 1): singleton dims fold nothing into the channels
        return
    _set_path_sum(node, after[-1] // before[-1], before[-1], into_node_widens=True)


def _set_path_sum(node, paths: int, channels: int, into_node_widens: bool) -> None:
    """Index maps between `node` and its inputs: K paths of C channels on one side, their sum on the other."""
    for inp in node.inputs:
        adapter.set_pair(node, inp, PathSum(paths, channels, widen=into_node_widens), PathSum(paths, channels, widen=not into_node_widens))


def _map_pixel_shuffle(node) -> None:
    """Give a pixel shuffle (C * r * r channels -> C) or unshuffle (C -> C * r * r) node, which Torch-Pruning 1.6 takes
    for an elementwise op, the index map it defines; the node's own index space is its output's channels."""
    name = type(node.grad_fn).__name__
    if name not in ("PixelShuffleBackward0", "PixelUnshuffleBackward0"):
        return
    shuffle = name == "PixelShuffleBackward0"
    factor = int(saved(node.grad_fn, "upscale_factor" if shuffle else "downscale_factor")) ** 2
    for inp in node.inputs:  # input -> node: narrow to the output's channels (shuffle) or widen (unshuffle), and back
        adapter.set_pair(node, inp, ChannelBlocks(factor, widen=not shuffle), ChannelBlocks(factor, widen=shuffle))


BROADCASTS = ("MulBackward0", "AddBackward0", "SubBackward0", "DivBackward0")


def _cut_broadcast(node) -> None:
    """An elementwise op of a one-channel tensor with a tensor of C channels (a separable self-attention's context
    scores times its keys, a spatial attention map times its features) broadcasts the one channel over all C: no
    channel of one is a channel of the other. Torch-Pruning 1.6 couples them as if they were the same channels, which
    ties the C channels into one; the one-channel side is cut off (a group of its own)."""
    fn = node.grad_fn
    if fn is None or type(fn).__name__ not in BROADCASTS or len(fn.next_functions) != 2 or None in (f for f, _ in fn.next_functions):
        return
    shapes = [output_shape(f, i) for f, i in fn.next_functions]
    if any(len(sh) < 3 for sh in shapes) or len({len(sh) for sh in shapes}) != 1:
        return
    channels = [int(sh[1]) for sh in shapes]
    if sorted(channels)[0] != 1 or max(channels) == 1:
        return
    small = fn.next_functions[channels.index(1)][0]
    adapter.cut(node, [n for n in node.inputs if n.grad_fn is small])


def _cut_pooling_weights(node) -> None:
    """A batched product (B, C, K) @ (B, K, 1) pools each of C channels over K positions with one weight vector (a
    global-context block's softmax over space, attention pooling): the weights' K positions are no channels of the C.
    Torch-Pruning 1.6 takes the product for an elementwise op of the two, coupling the C channels to the K positions
    (and, through the views before, to the one channel the weights came from); the weights' side is cut off."""
    fn = node.grad_fn
    if fn is None or type(fn).__name__ != "BmmBackward0" or None in (f for f, _ in fn.next_functions):
        return
    (a, i), (b, j) = fn.next_functions
    rows, weights = output_shape(a, i), output_shape(b, j)
    if len(rows) == len(weights) == 3 and weights[2] == 1 and rows[2] == weights[1] and rows[1] > 1:
        adapter.cut(node, [n for n in node.inputs if n.grad_fn is b])


UNIT_REDUCTIONS = ("AmaxBackward0", "AminBackward0", "MaxBackward0", "MinBackward0", "SumBackward1", "MeanBackward1")


def _unit_size(fn) -> int:
    """K when `fn` reduces dim 2 of a view of (N, U * K, ...) channels as (N, U, K, ...): channels made of units of K
    (maxout); 0 for any other node."""
    if type(fn).__name__ not in UNIT_REDUCTIONS:
        return 0
    dims = saved(fn, "dim")
    dims = tuple(dims) if isinstance(dims, tuple | list) else (dims,)
    sizes = saved_sizes(fn) or tuple(getattr(saved(fn, "self"), "shape", ()))
    if len(dims) != 1 or not isinstance(dims[0], int) or len(sizes) < 3:
        return 0
    dim = signed(dims[0]) % len(sizes)
    view = fn.next_functions[0][0]
    if dim != 2 or view is None or not view_sizes(view):
        return 0
    before = view_sizes(view)
    split = before[:1] + (sizes[1] * sizes[2],) + before[2:] == (sizes[0], sizes[1] * sizes[2]) + sizes[3:]
    return sizes[2] if split and len(before) == len(sizes) - 1 else 0


def _map_channel_units(node) -> None:
    """A reduction over units of K channels viewed as (N, U, K, ...) (maxout, a mean over channel pairs): position
    u * K + k of the view's input is unit u of the output, the index map of a pixel shuffle; the view itself keeps
    the flattened channel order. Torch-Pruning 1.6 takes the reduction for an elementwise op."""
    k = _unit_size(node.grad_fn) if node.grad_fn is not None else 0
    if k <= 1:
        return
    for inp in node.inputs:
        if inp.grad_fn is node.grad_fn.next_functions[0][0]:
            adapter.set_identity(inp)
    for inp in node.inputs:
        adapter.set_pair(node, inp, ChannelBlocks(k, widen=False), ChannelBlocks(k, widen=True))


def _map_paths(node) -> None:
    """Selective-kernel and split-attention blocks (SKNet, ResNeSt) stack K paths of C channels on a new dim 1, view
    an attention of K * C channels as (K, C), and sum over the paths. Their channel index is K * C flattened: a stack
    is a concatenation, a view that keeps the trailing (spatial) dims, or whose channels carry no spatial extent,
    changes nothing, and a sum over dim 1 of a 5-D tensor maps k * C + c to c. Torch-Pruning 1.6 takes the stack and
    the sum for elementwise ops and a view for a flatten."""
    fn, name = node.grad_fn, type(node.grad_fn).__name__
    if name == "StackBackward0" and saved(fn, "dim") == 1:
        producers = [f for f, _ in fn.next_functions]
        if None in producers or len({id(f) for f in producers}) != len(producers):
            return
        shapes = [output_shape(f, i) for f, i in fn.next_functions]
        if any(len(sh) < 3 for sh in shapes):
            return
        offsets = _offsets([int(sh[1]) for sh in shapes])
        for k, f in enumerate(producers):
            for inp in [n for n in node.inputs if n.grad_fn is f]:
                adapter.set_offsets(inp, node, 1, "concat", offsets[k : k + 2])
    elif name == "SumBackward1" and tuple(saved(fn, "dim")) == (1,) and len(saved_sizes(fn)) == 5 and not saved(fn, "keepdim"):
        _set_path_sum(node, saved_sizes(fn)[1], saved_sizes(fn)[2], into_node_widens=False)
    elif op_type(node) == "reshape" and _keeps_channel_order(fn):
        adapter.set_identity(node)


def _keeps_channel_order(fn) -> bool:
    """Whether a view/reshape only regroups the channel dims: it keeps 2 trailing spatial dims (N, K * C, H, W) <->
    (N, K, C, H, W), only adds or drops dims of size one, or its channels carry no spatial extent (per sample as many
    values as the conv above has channels)."""
    before = saved_sizes(fn)
    after = tuple(int(v) for v in input_shapes(fn)[0]) if input_shapes(fn) else ()
    if len(before) < 2 or len(after) < 2 or before[0] != after[0] or _prod(before[1:]) != _prod(after[1:]):
        return False
    if len(before) >= 4 and len(after) >= 4 and before[-2:] == after[-2:] and (len(before) == 5) != (len(after) == 5):
        return True
    if len(before) != len(after) and [d for d in before[1:] if d != 1] == [d for d in after[1:] if d != 1]:
        return True  # only dims of size one added or dropped (a pooled (N, 1, C, 1) viewed as (N, C, 1, 1))
    channels = _channels_above(fn)
    return channels is not None and channels == _prod(before[1:]) and max(len(before), len(after)) >= 4


def _channels_above(fn, depth: int = 12) -> int | None:
    """The output channels of the nearest conv above `fn` through parameter-free, shape-keeping ops (None: none found)."""
    for _ in range(depth):
        nxt = [f for f, _ in fn.next_functions if f is not None and type(f).__name__ != "AccumulateGrad"]
        if len(nxt) != 1:
            return None
        fn = nxt[0]
        if type(fn).__name__ == "ConvolutionBackward0":
            return int(input_shapes(fn)[0][1])
    return None


def _prod(dims: tuple) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + int(n))
    return out


def _swaps_last_two(fn) -> bool:
    """A transpose or permute of a (batch, a, b) tensor that swaps its last two dims."""
    shapes = input_shapes(fn)
    if len(shapes) != 1 or len(shapes[0]) != 3:
        return False
    if type(fn).__name__ == "TransposeBackward0":
        return {signed(saved(fn, d)) % 3 for d in ("dim0", "dim1")} == {1, 2}
    return type(fn).__name__ == "PermuteBackward0" and tuple(d % 3 for d in saved(fn, "dims")) == (0, 2, 1)


def cut_token_mixing(graph) -> tuple[set, set[str]]:
    """Take each token-mixing region out of the channels' graph; return the nodes that hand its output back and the
    names of the modules inside. A region
    (MLP-Mixer's token MLP, ResMLP's token layer, gMLP's spatial gate) starts at a swap of a (batch, tokens, channels)
    tensor's last two dims and ends at the swaps back; inside, every layer acts along the tokens, the same way for
    each channel. So a channel permutation passes through it unchanged: the swaps are joined directly (channel i in,
    channel i out), the layers inside belong to no channel group (Torch-Pruning 1.6 couples their token features to
    the channels), their hidden units form groups of their own, and the tokens stay where the patches put them."""
    swaps = {n for n in graph.module2node.values() if n.grad_fn is not None and _swaps_last_two(n.grad_fn)}
    last: set = set()
    mixing: set[str] = set()
    for entry in swaps:
        region = _token_region(entry, swaps)
        if region is None:
            continue
        inside, ends = region
        mixing.update(adapter.node_name(n) for n in inside if adapter.node_name(n) and isinstance(n.module, nn.Linear | nn.LayerNorm))
        adapter.cut(entry, [n for n in entry.outputs if n in inside])
        for end in ends:
            before = [n for n in end.inputs if n in inside]
            adapter.cut(end, before)
            last.update(before)
            adapter.join(graph, entry, end)
    return last, mixing


def _token_region(entry, swaps: set) -> tuple[set, set] | None:
    """(the nodes between `entry` and the swaps back, those swaps) when every path from `entry` ends at a swap back,
    no other data joins on the way and a linear layer acts along the tokens; else None."""
    inside, ends, todo = set(), set(), list(entry.outputs)
    while todo:
        node = todo.pop()
        if node in inside or node in ends:
            continue
        if node in swaps:
            ends.add(node)
            continue
        if not node.outputs or op_type(node) == "output":
            return None
        inside.add(node)
        todo.extend(node.outputs)
    # a node without inputs of its own (the transpose of a layer's weight) carries no data from elsewhere
    joined = any(i is not entry and i not in inside and i.inputs for n in inside | ends for i in n.inputs)
    linear = any(isinstance(n.module, nn.Linear) for n in inside)
    return None if joined or not linear or not ends else (inside, ends)


def channel_first_maps(model: nn.Module, x: torch.Tensor) -> set[int]:
    """The ids of (1, C, H, W) parameters added to or multiplied with a conv's (N, C, H, W) output (a learned position
    map): their channels are on dim 1, where Torch-Pruning 1.6 would take the last dim."""
    candidates = {id(p) for p in model.parameters() if p.dim() == 4 and p.shape[0] == 1 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1}
    if not candidates:
        return set()
    was_training = model.training
    try:
        with torch.enable_grad():
            out = model.eval()(x)
    except Exception:
        return set()  # the trace that follows says what fails
    finally:
        model.train(was_training)
    found, seen = set(), set()
    todo = [t.grad_fn for t in (out if isinstance(out, tuple | list) else [out]) if isinstance(t, torch.Tensor)]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        inputs = [f for f, _ in fn.next_functions if f is not None]
        held = [id(f.variable) for f in inputs if type(f).__name__ == "AccumulateGrad" and id(f.variable) in candidates]
        if held and any(_from_conv(f) for f in inputs if type(f).__name__ != "AccumulateGrad"):
            found.update(held)
        todo.extend(inputs)
    return found


def _from_conv(fn, depth: int = 8) -> bool:
    """Whether a tensor comes from a convolution through elementwise steps (no reshape, transpose or linear layer)."""
    for _ in range(depth):
        name = type(fn).__name__
        if name.startswith(("Convolution", "CudnnConvolution", "MkldnnConvolution")):
            return True
        if any(k in name for k in ("View", "Reshape", "Transpose", "Permute", "Addmm", "Mm", "LayerNorm")) or not fn.next_functions:
            return False
        fn = fn.next_functions[0][0]
        if fn is None:
            return False
    return False
