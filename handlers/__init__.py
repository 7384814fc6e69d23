"""The TorchServe custom handler and the preprocessing it shares with training."""
