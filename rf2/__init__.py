"""rf2: federated-learning simulator for recommendation with jointly sampled data and
device heterogeneity (RF², RecSys 2022) and a learned hierarchical retrieval index."""

__version__ = "0.1.0"
