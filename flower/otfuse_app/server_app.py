"""The ServerApp: the run config's strategy (otfuse's fusion, or Flower's FedAvg / FedProx) over the rounds."""

from otfuse.federated import apps

app = apps()[0]
