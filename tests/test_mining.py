"""Hard-negative mining keeps look-alikes inside the window and never a false negative."""
import numpy as np

from data_prep.mine_negatives import mine


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_window_margin_group_and_identical_text_filters():
    # Item 0's image sits near texts 1, 2, 3 with falling similarity; text 1 shares item 0's group,
    # text 2 is literally item 0's text, text 3 is a true look-alike, text 4 is far away.
    texts = unit([[1, 0, 0], [0.99, 0.1, 0], [1, 0, 0.001], [0.8, 0.6, 0], [0, 0, 1]])
    anchor = unit([[1, 0.05, 0], [0, 1, 0], [0, 1, 0.1], [0, 0.2, 1], [0, 0, 1]])
    groups = ["g0", "g0", None, None, None]
    keys = ["red star", "red star large", "red star", "red ring", "blue cube"]
    has = np.ones(5, dtype=bool)
    kept = mine(anchor, texts, has, has, groups, keys, k=4, per_item=2, min_score=0.2, max_score=0.99, margin=0.05)
    assert kept[0] == [3]  # 1 (same group) and 2 (same text) dropped; 4 is below min_score
    # Margin: a candidate scoring above the item's own positive minus the margin is dropped.
    strict = mine(anchor, texts, has, has, groups, keys, k=4, per_item=2, min_score=-1, max_score=1, margin=0.5)
    positive = float(anchor[0] @ texts[0])
    assert all(float(anchor[0] @ texts[j]) <= positive - 0.5 for j in strict[0])


def test_items_without_anchor_or_text_are_handled():
    texts = unit([[1, 0], [0.9, 0.1], [0, 1]])
    anchor = unit([[1, 0], [0, 1], [0.5, 0.5]])
    has_anchor = np.array([True, False, True])
    has_text = np.array([True, True, False])
    kept = mine(anchor, texts, has_anchor, has_text, [None] * 3, ["a", "b", "c"], k=3, per_item=3,
                min_score=-1, max_score=1, margin=0.0)
    assert kept[1] == []  # no anchor -> nothing mined
    assert 2 not in kept[0]  # item 2 has no text -> never a candidate
    assert kept[2] and all(j != 2 for j in kept[2])  # an item without its own text still gets negatives
