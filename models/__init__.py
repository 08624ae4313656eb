"""BlockDrop models: flat ResNets whose blocks can be skipped, and the policy networks."""
