"""The ClientApp: this SuperNode's partition (its partition-id of num-partitions), trained locally each round."""

from otfuse.federated import apps

app = apps()[1]
