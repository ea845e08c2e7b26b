"""Recommenders we measure the head against, on the same split: two of our own (popularity and
content-kNN on the aligned vectors) and the real libraries' models (cornac: MostPop, ItemKNN,
BPR, EASE, VBPR fed our aligned item vectors; implicit: BPR, ALS), driven through their public
APIs with our training interactions.

Every method answers ``scores(users) -> (u, N) float32`` over the whole catalogue, ``-inf``
where it cannot score: collaborative models know only items and users that had training
interactions, so a cold item (or a user with none) is unscorable for them, and the evaluation
counts that as the miss it is, not as a gap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import numpy as np

from align.rec.interactions import Interactions

UNSCORABLE = -np.inf


@dataclass
class FitData:
    """What a method may learn from: training interactions and the aligned item vectors."""

    train: Interactions
    content: np.ndarray  # (N, D) float32 unit rows (zero where the item has none)
    seen: List[np.ndarray]  # per user: distinct training items

    @property
    def n_items(self) -> int:
        return len(self.train.item_ids)

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.train.items, minlength=self.n_items)


class MostPopular:
    """Training interaction count; the same list for everyone. An item nobody touched in
    training has no count to rank by: unscorable, not tied at zero."""

    name = "most_pop"

    def fit(self, data: FitData) -> "MostPopular":
        counts = data.counts
        self.popularity = np.where(counts > 0, counts, UNSCORABLE).astype(np.float32)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.popularity, (len(users), len(self.popularity))).copy()


class ContentKNN:
    """Cosine between an item's aligned vector and the mean of the user's training items' vectors
    (item-to-item kNN on content, summed over the history). Scores cold items; a user with no
    history has no profile and is unscorable."""

    name = "content_knn"

    def fit(self, data: FitData) -> "ContentKNN":
        self.content = data.content
        self.profiles = np.zeros((len(data.seen), data.content.shape[1]), dtype=np.float32)
        for user, items in enumerate(data.seen):
            if len(items):
                self.profiles[user] = data.content[items].mean(0)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        scores = self.profiles[users] @ self.content.T  # (u, N)
        scores[~self.profiles[users].any(1)] = UNSCORABLE
        return scores


class CornacModel:
    """A cornac recommender on our training interactions (implicit feedback as rating 1)."""

    def __init__(self, name: str, build: Callable[[], object], features: bool = False) -> None:
        self.name, self.build, self.features = name, build, features

    def fit(self, data: FitData) -> "CornacModel":
        import cornac

        triples = [(data.train.user_ids[u], data.train.item_ids[i], 1.0)
                   for u, i in set(zip(data.train.users.tolist(), data.train.items.tolist()))]
        train_set = cornac.data.Dataset.from_uir(sorted(triples), seed=0)
        if self.features:  # VBPR: the aligned vectors stand in for its CNN image features
            modality = cornac.data.ImageModality(features=data.content, ids=data.train.item_ids, normalized=True)
            modality.build(id_map=train_set.iid_map)
            train_set.add_modalities(item_image=modality)
        self.model = self.build()
        self.model.fit(train_set)
        # cornac's item index -> our item code; its user index for each of our user codes (-1: unknown)
        code_of_item = {item: code for code, item in enumerate(data.train.item_ids)}
        self.item_codes = np.array([code_of_item[i] for i in train_set.item_ids], dtype=np.int64)
        self.user_index = np.array([train_set.uid_map.get(u, -1) for u in data.train.user_ids], dtype=np.int64)
        self.n_items = data.n_items
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        out = np.full((len(users), self.n_items), UNSCORABLE, dtype=np.float32)
        for row, user in enumerate(users):
            index = self.user_index[user]
            if index >= 0:
                out[row, self.item_codes] = self.model.score(int(index))
        return out


class ImplicitModel:
    """An ``implicit`` matrix factorisation on the (users x items) training matrix."""

    def __init__(self, name: str, build: Callable[[], object]) -> None:
        self.name, self.build = name, build

    def fit(self, data: FitData) -> "ImplicitModel":
        from scipy.sparse import csr_matrix
        from threadpoolctl import threadpool_limits  # a dependency of implicit

        matrix = csr_matrix((np.ones(len(data.train), dtype=np.float32), (data.train.users, data.train.items)),
                            shape=(len(data.train.user_ids), data.n_items))
        matrix.data[:] = 1.0  # repeated interactions count once (duplicates were summed)
        with threadpool_limits(1, "blas"):  # implicit parallelises itself; a threaded BLAS underneath thrashes
            self.model = self.build()  # (it checks the BLAS threads when built)
            self.model.fit(matrix, show_progress=False)
        self.known_items = data.counts > 0  # an item without interactions keeps its random factors
        self.known_users = np.array([len(s) > 0 for s in data.seen])
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        user_factors, item_factors = (np.asarray(self.model.user_factors), np.asarray(self.model.item_factors))
        scores = (user_factors[users] @ item_factors.T).astype(np.float32)
        scores[:, ~self.known_items] = UNSCORABLE
        scores[~self.known_users[users]] = UNSCORABLE
        return scores


def _cornac(name: str, cls: str, features: bool = False, **params) -> Callable[[], CornacModel]:
    def build() -> object:
        import cornac.models

        return getattr(cornac.models, cls)(**params)

    return lambda: CornacModel(name, build, features)


def _implicit(name: str, cls: str, **params) -> Callable[[], ImplicitModel]:
    def build() -> object:
        import implicit.cpu.als
        import implicit.cpu.bpr

        module = implicit.cpu.bpr if cls == "BayesianPersonalizedRanking" else implicit.cpu.als
        return getattr(module, cls)(random_state=0, num_threads=0, **params)

    return lambda: ImplicitModel(name, build)


# name -> factory; settings are the libraries' usual ones for a catalogue of thousands of items.
PEERS: Dict[str, Callable[[], object]] = {
    "most_pop": MostPopular,
    "content_knn": ContentKNN,
    "cornac_mostpop": _cornac("cornac_mostpop", "MostPop"),
    "cornac_itemknn": _cornac("cornac_itemknn", "ItemKNN", k=50, similarity="cosine", verbose=False),
    "cornac_bpr": _cornac("cornac_bpr", "BPR", k=64, max_iter=100, learning_rate=0.01, lambda_reg=0.01, seed=0),
    "cornac_ease": _cornac("cornac_ease", "EASE", lamb=200, verbose=False, seed=0),
    "cornac_vbpr": _cornac("cornac_vbpr", "VBPR", features=True, k=32, k2=32, n_epochs=20, batch_size=256,
                           learning_rate=0.005, verbose=False, seed=0),
    "implicit_bpr": _implicit("implicit_bpr", "BayesianPersonalizedRanking", factors=64, iterations=100),
    "implicit_als": _implicit("implicit_als", "AlternatingLeastSquares", factors=64, iterations=15),
}


def build_peer(name: str):
    """A fresh, unfitted peer by name (``PEERS``); an unknown name lists the known ones."""
    if name not in PEERS:
        raise KeyError(f"unknown recommender {name!r}; known: {', '.join(PEERS)}")
    return PEERS[name]()
