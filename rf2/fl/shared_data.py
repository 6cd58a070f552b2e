"""The federated dataset in Ray's object store: built once by the driver, read by every
client worker of the cluster.

The driver ``ray.put``s the whole :class:`~rf2.data.base.FederatedDataset` once. Ray
serialises it with pickle protocol 5, so its NumPy arrays travel out of band: on the
driver's node every worker's ``ray.get`` returns read-only views into the node's shared
object store (no per-worker copy); another node fetches the object once into its own
store, and its workers share that copy. Client actors receive a :class:`SharedDataset`
(a handle holding the object reference) in their spec, never a path: worker nodes need
no data files and never load or generate the dataset themselves.

The driver must keep its handle alive for the whole simulation: the reference is what
keeps the object in the store (Ray counts borrowers such as the actors that hold it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from rf2.data.base import FederatedDataset


@dataclass(frozen=True)
class SharedDataset:
    """A reference to a dataset in Ray's object store (small and picklable)."""

    ref: Any  # ray.ObjectRef of a FederatedDataset

    def fetch(self) -> FederatedDataset:
        """The dataset, its arrays read-only views into this node's object store."""
        import ray

        dataset = ray.get(self.ref)
        if not isinstance(dataset, FederatedDataset):
            raise TypeError(f"the shared object is a {type(dataset).__name__}, "
                            "not a FederatedDataset")
        if dataset.item_genres is not None:
            # The model turns genres into a tensor, which torch wants writable; it is
            # small (items x genres), unlike the click arrays, which stay shared.
            dataset = dataclasses.replace(dataset, item_genres=np.array(dataset.item_genres))
        return dataset


def share(dataset: FederatedDataset) -> SharedDataset:
    """Put ``dataset`` into the object store of the Ray this process is connected to."""
    import ray

    return SharedDataset(ray.put(dataset))
