"""otfuse's Flower App: the ServerApp and ClientApp of otfuse.federated, read from the run config."""
