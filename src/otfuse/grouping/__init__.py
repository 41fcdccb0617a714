"""Channel groups: the sets of channels that must move together, found by Torch-Pruning's DepGraph and checked to
permute a model exactly.

    from otfuse.grouping.exact import channel_groups      # or `from otfuse import channel_groups`
    groups = channel_groups(model, example_input)         # forward order, classifier outputs excluded

A group is a set of channels that must move together: a conv's outputs, the BatchNorm after it, the next convs'
inputs, every tensor tied by a residual addition, the slices a torch.cat splices into its consumers. Each member
names a tensor, an axis and, per group channel, the indices of that axis that belong to it (several for a Linear
after a flatten, or for the two halves of a GLU gate that multiply each other).

Channels that reach different consumers (a `split`, `chunk` or slice along the channel axis, a residual added to
some channels only) form one group per part: a part's channels move among themselves. Channels viewed as units of K
and reduced over the unit (maxout: a view as (N, U, K, ...) and a max over dim 2) move as whole units: a group
channel is a unit, K positions. A GroupNorm's channels move within their norm group (or whole norm groups move), as
a grouped conv's do. Parametrised weights (`torch.nn.utils.parametrize`: weight_norm, spectral_norm, any
parametrisation that commutes with permuting channels) are carried through the tensors the model stores; the old
`torch.nn.utils.weight_norm` is refused by name.

One job a module, each importing only those above it:
- `attention`, `einsum`: layers DepGraph cannot follow inside, recognised by structure and traced as one layer;
- `group`: `ChannelGroup`, `Member`, `Observation`, `check_same_groups`;
- `adapter`: the only importer of Torch-Pruning and the only reader of private torch and Torch-Pruning
  attributes: the version guard, the trace, index maps read and written, channels followed through the graph;
- `recognise`, `shuffles`: what an op does to the channels where Torch-Pruning 1.6 gets it wrong; refused shuffles;
- `heads`, `members`, `blocks`: attention layers' inner groups; a producer's reach made groups; grouped convs' blocks;
- `trace`: `find_groups`, the pipeline and its refusals;
- `exact`: `channel_groups` and `groups_of`: found, then checked numerically on a random-weight copy.
"""
