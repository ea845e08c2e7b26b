"""Search explanations where the fused vector the index holds is not the mean of the item's stored
modality vectors: an index cut with `align index --dim` is explained with the vectors it searched
(it was a shape error), and there, after `align embed --dim` and for a checkpoint with
model.fields, the modality shares are the split of the very score the index returned: each
matches a float64 reference made from the full-width (or field) vectors, within what float32
rounding allows, and they sum to the score."""
import json
import math
import os

import numpy as np
import pytest
import torch

from align.config import FieldConfig
from align.explain.report import Explainers, search_explainer
from align.index.build import main as index_main
from align.index.embed import embed_manifests
from align.index.search import open_catalogue, search
from align.index.vectors import load_item_embeddings
from align.search.command import main as search_main
from tests.conftest import EPS32, logit_error
from tests.test_index import embed, fields_checkpoint
from tests.test_search import checkpoint  # noqa: F401

DIM = 32  # model.embed_dim in tiny_overrides
CUT = 16
QUERY = "small red star"
FIELDS = {"image": ("image", [], 1.0), "title": ("text", ["title"], 1.0),  # fields_checkpoint's, weight 2
          "attributes": ("text", ["colour", "kind"], 2.0)}


@pytest.fixture(scope="module")
def fields_model(checkpoint, tmp_path_factory):  # noqa: F811
    """The checkpoint with model.fields: photo 1, title 1, colour + kind 2 (test_index's), no sound."""
    return fields_checkpoint(checkpoint, tmp_path_factory.mktemp("fields") / "model", 2.0)


@pytest.fixture(scope="module")
def field_vectors(checkpoint, fields_model, small_demo):  # noqa: F811
    """{"modalities" | "fields": {name: (modality, weight, (N, D) float64 unit rows, (N,) mask)}}: the
    full-width vectors the fused ones are made of, the model's modalities, and each field of
    ``fields_model`` embedded alone (as `align embed` embeds it, at its batch size, then fused by
    itself: its own vector normalised twice)."""
    manifest = os.path.join(small_demo, "test.csv")
    plain = embed_manifests(checkpoint, [manifest], batch_size=16, device="cpu", progress=False)
    out = {"modalities": {m: (m, 1.0, unit64(plain.vectors[m]), plain.masks[m]) for m in plain.modalities},
           "fields": {}}
    for name, (modality, columns, weight) in FIELDS.items():
        alone = embed_manifests(fields_model, [manifest], batch_size=16, device="cpu", progress=False,
                                fields={name: FieldConfig(modality, columns, 1.0)})
        out["fields"][name] = (modality, weight, unit64(alone.vectors[modality]), alone.masks[modality])
    return out


def unit64(vectors):
    return vectors.double() / vectors.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)


def normalise_error(n):
    """Bound on |fl(normalize(x)) - x/|x|| for float32 x of n entries: the sum of n squares is off
    by (n + 1) eps relatively, its square root by half that and one more, the division by one."""
    return (n / 2 + 3) * EPS32


def fuse_error(width, count, mean_norm):
    """Bound on |fuse(v) - m/|m|| (align.fields.fuse in float32), m the weighted mean of ``count``
    unit vectors of ``width`` entries, |m| = ``mean_norm``: each input is normalised again (off by
    normalise_error), the weighted sum and the division add (count + 1) eps of the weights' total,
    and normalising a vector e away from m moves it by at most 2 e / |m|, and rounds once more."""
    return 2 * (normalise_error(width) + (count + 1) * EPS32) / mean_norm + normalise_error(width)


def cut_error(error, full_norm, cut_norm, dim):
    """``error`` (a bound on a vector off m/|m|, |m| = ``full_norm``) after the cut to its first
    ``dim`` coordinates (|m[:dim]| = ``cut_norm``) and renormalisation (align.model.prefix)."""
    return 2 * error * full_norm / cut_norm + normalise_error(dim)


def reference_split(parts, row, query, dim, fields):
    """The float64 split of the query's cosine with the fused vector of the item at ``row``:
    m = sum_f w_f psi_f over its present parts (unit rows), cut to ``dim``; modality k's share is
    sum_{f of k} w_f <q, psi_f[:dim]> / |m[:dim]|.

    Returns ({modality: share}, a bound on each share the explanation may give from its float32
    vectors, a bound on its rest). The fused vector f* = sum_k a*_k u*_k with u*_k = m_k[:dim] /
    |m_k[:dim]| (m_k: modality k's own parts) and a*_k = |m_k[:dim]| / |m[:dim]|; float32 vectors
    f = f* + df, U = U* + dU give a = U^+ f = a* + U^+ (df - dU a*) exactly, so each share
    a_k <q, u_k> is off by at most (|df| + sqrt(M) du |a*|) / sigma_min(U) * (1 + du) + a*_k du,
    and the part of f outside U's columns is at most |df| + sqrt(M) du |a*|. Field vectors embedded
    alone here went through two more normalisations than align embed's (3 normalise_error): their
    m moves by that times the weights, which fields add to du and df.
    """
    q = query.double()
    present = [(modality, w, psi[row]) for modality, w, psi, mask in parts.values() if mask[row] and w > 0]
    width = present[0][2].shape[0]
    m = sum(w * psi for _, w, psi in present)  # (width,)
    total = sum(w for _, w, _ in present)
    df = fuse_error(width, len(present), float(m.norm()) / total)
    if dim < width:
        df = cut_error(df, float(m.norm()), float(m[:dim].norm()), dim)
    if fields:
        df += 2 * 3 * normalise_error(width) * total / float(m[:dim].norm())
    shares, columns, coefficients, du = {}, [], [], 0.0
    for k in sorted({modality for modality, _, _ in present}):
        own = [(w, psi) for modality, w, psi in present if modality == k]
        mk = sum(w * psi for w, psi in own)
        shares[k] = sum(w * float(q @ psi[:dim]) for w, psi in own) / float(m[:dim].norm())
        columns.append(mk[:dim] / mk[:dim].norm())
        coefficients.append(float(mk[:dim].norm() / m[:dim].norm()))
        if fields:  # align embed stores a modality's vector as the fusion of its fields
            weight = sum(w for w, _ in own)
            error = fuse_error(width, len(own), float(mk.norm()) / weight)
            error = error if dim == width else cut_error(error, float(mk.norm()), float(mk[:dim].norm()), dim)
            du = max(du, error + 2 * 3 * normalise_error(width) * weight / float(mk[:dim].norm()))
        else:  # the tower's unit vector as it is, or its cut
            du = max(du, normalise_error(dim))
    a, count = np.array(coefficients), len(columns)
    sigma = float(torch.linalg.svdvals(torch.stack(columns, 1)).min()) - math.sqrt(count) * du  # Weyl
    assert sigma > 0.05, (row, sigma)  # the item's modality vectors are far from parallel: the split is defined
    outside = df + math.sqrt(count) * du * np.linalg.norm(a)
    return shares, outside / sigma * (1 + du) + a.max() * du, outside


CASES = {  # (model.fields?, where the vectors are cut)
    "full width": (False, None),
    "align index --dim": (False, "index"),
    "align embed --dim": (False, "embed"),
    "fields": (True, None),
    "fields, align index --dim": (True, "index"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_modality_shares_split_the_score_the_index_returned(case, checkpoint, fields_model, field_vectors,  # noqa: F811
                                                             small_demo, tmp_path):
    fields, cut = CASES[case]
    model = fields_model if fields else checkpoint
    assert embed(model, tmp_path / "items", os.path.join(small_demo, "test.csv"),
                 extra=["--dim", str(CUT)] if cut == "embed" else []) == 0
    assert index_main(["--embeddings", str(tmp_path / "items"), "--out", str(tmp_path / "index"), "--kind", "exact",
                       *(["--dim", str(CUT)] if cut == "index" else [])]) == 0
    index, encoder = open_catalogue(str(tmp_path / "index"), device="cpu")
    dim = CUT if cut else DIM
    assert index.info["dim"] == encoder.dim == dim
    query = encoder.encode("text", [QUERY])  # (1, dim)
    results = search(index, query, 10)[0]
    explained = search_explainer(index, encoder).explain(query[0], [r["id"] for r in results])["results"]
    parts = field_vectors["fields" if fields else "modalities"]
    row_of = load_item_embeddings(str(tmp_path / "items")).row_of()
    for result, why in zip(results, explained):
        modalities = why["modalities"]
        shares, bound, outside = reference_split(parts, row_of[result["id"]], query[0], dim, fields)
        assert set(modalities["shares"]) == {"text", "image", "audio"}  # the model's, had by the item or not
        for name, share in modalities["shares"].items():
            assert abs(share - shares.get(name, 0.0)) <= bound, (case, result["id"], name, share, shares, bound)
        # they sum to the score the index returned: the same float32 vectors, its float32 dot product
        rest = modalities.get("rest", 0.0)
        assert sum(modalities["shares"].values()) + rest == pytest.approx(modalities["score"], abs=1e-12)
        assert abs(rest) <= outside
        assert abs(modalities["score"] - result["score"]) <= logit_error(dim, 1.0)


def test_align_search_explains_an_index_cut_with_dim_in_text_and_json(checkpoint, small_demo, tmp_path,  # noqa: F811
                                                                       capsys):
    assert embed(checkpoint, tmp_path / "items", os.path.join(small_demo, "test.csv")) == 0
    assert index_main(["--embeddings", str(tmp_path / "items"), "--out", str(tmp_path / "index"),
                       "--dim", str(CUT)]) == 0
    capsys.readouterr()
    command = ["--index", str(tmp_path / "index"), "--text", QUERY, "-k", "3", "--explain", "--device", "cpu"]
    assert search_main(command + ["--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["query_words"] and len(answer["results"]) == 3
    for result in answer["results"]:
        modalities = result["explanation"]["modalities"]
        assert abs(modalities["score"] - result["score"]) <= logit_error(CUT, 1.0)
    assert search_main(command) == 0
    text = capsys.readouterr().out
    assert "modalities: an exact split of the fused cosine" in text and text.count("      modalities  ") == 3
    # float32 rounding only in rest: not shown at 4 decimals
    assert not any("rest" in line for line in text.splitlines() if line.startswith("      modalities  "))
    # the server's explainers (POST /search with "explain": true) build theirs the same way
    index, encoder = open_catalogue(str(tmp_path / "index"), device="cpu")
    query = encoder.encode("text", [QUERY])
    ids = [r["id"] for r in search(index, query, 3)[0]]
    assert [r["id"] for r in Explainers(encoder, index).search(query[0].numpy(), ids)["results"]] == ids
