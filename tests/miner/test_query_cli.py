"""``hardneg mine`` in query mode (in-process, and as a real process for the refusals): qrels, the trainer layouts, texts, Parquet and the rescoring hook.

Every written row is checked against a brute-force ranking of the corpus (exact float64 d², positives
removed), and the JSONL against what the ``datasets`` library reads back (skipped when it is absent).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hardneg.cli import main
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore

REPO = Path(__file__).resolve().parents[2]
N_NEG = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, clusters):
    """A cosine corpus of 200 documents, 12 queries with 1-2 qrels positives each (plus a relevance-0 line
    and a line for a query that is not asked), id -> text files, and the brute-force expectation."""
    root = tmp_path_factory.mktemp("query-mine")
    data = clusters(200, 8, 5, seed=61)
    SnapshotStore(root / "store").publish(VectorIndex.build(data.vectors, data.labels, data.ids))
    queries, qlab = data.near(12, seed=62)
    qids = np.arange(12, dtype=np.int64) * 10 + 7
    np.save(root / "q.npy", queries)
    np.save(root / "qi.npy", qids)
    rng = np.random.default_rng(63)
    positives = {int(q): rng.choice(data.ids[data.labels == lab], rng.integers(1, 3), replace=False).tolist()
                 for q, lab in zip(qids, qlab)}
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, ds in positives.items() for d in ds]
    lines += [f"{qids[0]}\t{data.ids[5]}\t0", "99999\t1000\t1"]  # not relevant; another query
    (root / "qrels.tsv").write_text("\n".join(lines) + "\n")
    (root / "docs.jsonl").write_text("".join(json.dumps({"_id": int(i), "title": "t", "text": f"doc {i}"}) + "\n"
                                             for i in data.ids))
    (root / "queries.tsv").write_text("".join(f"{q}\tquery {q}\n" for q in qids))
    x = data.vectors / np.linalg.norm(data.vectors, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ranking = {}
    for q, v in zip(qids, qn.astype(np.float64)):
        d2 = ((x - v) ** 2).sum(1)
        ranking[int(q)] = [int(data.ids[r]) for r in np.argsort(d2) if int(data.ids[r]) not in positives[int(q)]]
    return root, positives, ranking, data


def run(root: Path, out: Path, *extra: str) -> dict:
    args = ["mine", "--store", str(root / "store"), "--queries", str(root / "q.npy"), "--query-ids",
            str(root / "qi.npy"), "--qrels", str(root / "qrels.tsv"), "--num-negatives", str(N_NEG), "--out",
            str(out), "--json", *extra]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    return json.loads(buf.getvalue())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_triplets_are_the_nearest_non_positives(corpus, tmp_path) -> None:
    root, positives, ranking, _ = corpus
    info = run(root, tmp_path / "t.jsonl", "--range-min", "1")
    rows = read_jsonl(tmp_path / "t.jsonl")
    want = [{"anchor": q, "positive": p, "negative": n} for q, ps in positives.items() for p in ps
            for n in ranking[q][1:1 + N_NEG]]
    assert rows == want
    assert info["rows"] == len(want) and info["qrels_other_queries"] == 1
    assert info["stats"]["anchors"] == 12 and info["stats"]["anchors_mined"] == 12


def test_pml_npz_holds_the_same_triplets(corpus, tmp_path) -> None:
    root, positives, ranking, _ = corpus
    run(root, tmp_path / "t.npz", "--format", "pml")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as z:
        got = list(zip(z["anchor"].tolist(), z["positive"].tolist(), z["negative"].tolist()))
    assert got == [(q, p, n) for q, ps in positives.items() for p in ps for n in ranking[q][:N_NEG]]


def test_flagembedding_jsonl_with_texts(corpus, tmp_path) -> None:
    root, positives, ranking, _ = corpus
    run(root, tmp_path / "fe.jsonl", "--format", "flagembedding", "--texts", str(root / "docs.jsonl"),
        "--query-texts", str(root / "queries.tsv"))
    rows = read_jsonl(tmp_path / "fe.jsonl")
    assert rows == [{"query": f"query {q}", "pos": [f"t doc {p}" for p in ps],
                     "neg": [f"t doc {n}" for n in ranking[q][:N_NEG]]} for q, ps in positives.items()]


# The columns sentence-transformers' mine_hard_negatives gives each layout (for anchor/positive input columns).
ST_COLUMNS = {"triplet": ["anchor", "positive", "negative"],
              "n-tuple": ["anchor", "positive"] + [f"negative_{i}" for i in range(1, N_NEG + 1)],
              "labeled-pair": ["anchor", "positive", "label"],
              "labeled-list": ["anchor", "positive", "labels"]}


@pytest.mark.parametrize("fmt", sorted(ST_COLUMNS))
def test_datasets_loads_the_sentence_transformers_columns(corpus, tmp_path, fmt: str) -> None:
    datasets = pytest.importorskip("datasets")
    root, positives, ranking, _ = corpus
    out = tmp_path / f"{fmt}.jsonl"
    run(root, out, "--format", fmt, "--texts", str(root / "docs.jsonl"), "--query-texts", str(root / "queries.tsv"))
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert ds.column_names == ST_COLUMNS[fmt]
    doc = lambda i: f"t doc {i}"  # noqa: E731
    want: list[dict] = []
    for q, ps in positives.items():
        negs = [doc(n) for n in ranking[q][:N_NEG]]
        if fmt == "triplet":
            want += [{"anchor": f"query {q}", "positive": doc(p), "negative": n} for p in ps for n in negs]
        elif fmt == "n-tuple":
            want += [{"anchor": f"query {q}", "positive": doc(p), **{f"negative_{i + 1}": n for i, n in enumerate(negs)}}
                     for p in ps]
        elif fmt == "labeled-pair":
            want += [{"anchor": f"query {q}", "positive": doc(p), "label": 1} for p in ps]
            want += [{"anchor": f"query {q}", "positive": n, "label": 0} for n in negs]
        else:
            want += [{"anchor": f"query {q}", "positive": [doc(p)] + negs, "labels": [1] + [0] * N_NEG} for p in ps]
    assert ds.to_list() == want


def test_parquet_equals_jsonl(corpus, tmp_path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    root, _, _, _ = corpus
    run(root, tmp_path / "a.jsonl", "--format", "n-tuple", "--sampling", "random", "--range-max", "8", "--seed", "3")
    run(root, tmp_path / "a.parquet", "--format", "n-tuple", "--sampling", "random", "--range-max", "8", "--seed", "3")
    assert pq.read_table(tmp_path / "a.parquet").to_pylist() == read_jsonl(tmp_path / "a.jsonl")


SCORER = '''
calls = []


def score(pairs):
    """A stand-in cross-encoder: documents with an even id score 1, odd ones 0; positives score 0.5 + id parity."""
    calls.append(len(pairs))
    return [1.0 if doc % 2 == 0 else 0.0 for _, doc in pairs]
'''


def test_rescore_hook_drops_what_the_scorer_flags(corpus, tmp_path, monkeypatch, capsys) -> None:
    root, positives, ranking, _ = corpus
    (tmp_path / "scorer_mod.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "r.jsonl"
    args = ["mine", "--store", str(root / "store"), "--queries", str(root / "q.npy"), "--query-ids",
            str(root / "qi.npy"), "--qrels", str(root / "qrels.tsv"), "--num-negatives", str(N_NEG), "--out", str(out),
            "--format", "flagembedding", "--rescore", "scorer_mod:score", "--rescore-max", "0.5",
            "--rescore-batch", "7", "--json"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    import scorer_mod

    assert scorer_mod.calls and max(scorer_mod.calls) <= 7
    rows = read_jsonl(out)
    assert rows == [{"query": q, "pos": ps, "neg": [n for n in ranking[q] if n % 2][:N_NEG]}
                    for q, ps in positives.items()]
    # Every candidate it looked at before the kept ones: the even ids among the ranking's head.
    dropped = info["stats"]["guard_dropped"]["rescore"]
    assert dropped >= sum(1 for q, row in zip(positives, rows) for n in ranking[q][:ranking[q].index(row["neg"][-1])]
                          if n % 2 == 0)
    assert dropped > 0


@pytest.mark.parametrize("extra,message", [
    (["--strategy", "hardest"], "--strategy is for label mode"),
    (["--range-min", "2", "--range-max", "3"], "must hold at least --num-negatives"),
    (["--rescore-max", "0.5"], "need --rescore MODULE:ATTR"),
    (["--rescore", "no_such_module_xyz:f", "--rescore-max", "1"], "cannot import module 'no_such_module_xyz'"),
    (["--format", "pml"], "writes an .npz"),
    (["--format", "triplet", "--texts", "MISSING"], "does not exist"),
    (["--per-anchor", "4"], "--per-anchor belongs to label mode; use --num-negatives"),
    (["--window-width", "9"], "--window-width belongs to label mode; use --range-max"),
])
def test_query_mode_refusals(corpus, tmp_path, capsys, extra, message) -> None:
    root, _, _, _ = corpus
    extra = [str(tmp_path / "nope.jsonl") if e == "MISSING" else e for e in extra]
    out = tmp_path / "x.jsonl"
    assert main(["mine", "--store", str(root / "store"), "--queries", str(root / "q.npy"), "--qrels",
                 str(root / "qrels.tsv"), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_qrels_and_texts_say_where(corpus, tmp_path) -> None:
    from hardneg.miner.errors import ValidationError
    from hardneg.miner.formats import read_qrels, read_texts

    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\n3\tfour\n")
    with pytest.raises(ValidationError, match="line 2"):
        read_qrels(bad, np.array([1, 3]))
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"_id": 1, "text": "a"}\n{"id": 2}\n')
    with pytest.raises(ValidationError, match="line 2"):
        read_texts(texts)


def test_label_mode_refuses_query_mode_flags(corpus, tmp_path) -> None:
    root, _, _, _ = corpus
    done = subprocess.run([sys.executable, "-m", "hardneg.cli", "mine", "--store", str(root / "store"), "--strategy",
                           "hardest", "--qrels", str(root / "qrels.tsv"), "--out", str(tmp_path / "x.npz")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0 and "--qrels belongs to query mode" in done.stderr
