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


def test_mining_a_parquet_manifest_writes_parquet(tmp_path):
    """`align prep mine-negatives` on a Parquet catalogue writes the same rows plus the negatives."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from align.config import load_config
    from align.data.demo_catalogue import build_demo_catalogue
    from align.model import build_model
    from align.train.checkpoint import save_model
    from data_prep.mine_negatives import main
    from tests.conftest import TINY_CLIP

    build_demo_catalogue(str(tmp_path), seed=0, n_train=8, n_test=24, image_size=32, clip_seconds=0.5)
    manifest = tmp_path / "test.parquet"
    pq.write_table(pcsv.read_csv(tmp_path / "test.csv"), manifest)
    config = load_config(None, ["model.embed_dim=32", "data.columns.text=[title]", "data.num_workers=0",
                                f"model.towers={{image: {{type: open_clip_image, model: {TINY_CLIP}}}, "
                                f"text: {{type: open_clip_text, model: {TINY_CLIP}}}}}"])
    save_model(build_model(config.model), config, str(tmp_path / "model"))
    out = tmp_path / "mined.parquet"
    assert main(["--checkpoint", str(tmp_path / "model"), "--manifest", str(manifest), "--out", str(out),
                 "--min-score", "-1", "--max-score", "1", "--margin", "-2", "--device", "cpu"]) == 0
    source, mined = pq.read_table(manifest).to_pylist(), pq.read_table(out).to_pylist()
    assert [row["id"] for row in mined] == [row["id"] for row in source]
    assert all({**row, "negatives": None, "negative_ids": None} == {**old, "negatives": None, "negative_ids": None}
               for row, old in zip(mined, source))
    texts = {str(row["id"]): row["title"] for row in source}  # ids come back as strings
    with_image = [row for row in mined if row.get("image")]
    assert with_image and all(row["negative_ids"] for row in with_image)
    for row in mined:
        assert row["negatives"] == [texts[i] for i in row["negative_ids"]] and str(row["id"]) not in row["negative_ids"]
