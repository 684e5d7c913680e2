"""Query-mode mining side by side with sentence-transformers' ``mine_hard_negatives`` on the same embeddings.

For each corpus size (default 100k and 1M documents, d=128, 1,000 topics, seeded), ``--queries`` queries
near a topic centre each get 1-3 positives of their topic (a qrels with several positives per query).
Both miners see the very same vectors: sentence-transformers through a model stub whose ``encode_*``
look the texts' vectors up (no model is downloaded or run), hardneg through a flat cosine snapshot.
Both produce sentence-transformers' ``n-tuple`` rows (query text, positive text, negative_1..N texts)
for the same options: ``num_negatives``, ``range_min``/``range_max``, ``sampling_strategy="top"`` and
optionally ``relative_margin``. sentence-transformers runs with ``use_faiss=True`` (its documented setup for
large corpora) and with ``use_faiss=False`` (torch matmul + topk in blocks of 512 queries: its default block of
16384 would need 64 GB at 1M); the faster of the two is the baseline. Under the margin, sentence-transformers
ranks only the ``range_max + max_positives`` candidates it fetched, so it gets ``range_max=--st-depth`` (deep
enough to fill the window) while hardneg searches past each query's margin radius in one pass.

Reported per size: wall-clock and process CPU seconds of each (hardneg's snapshot build apart, since a
snapshot is built once and mined many times; also the ratio including it), and the overlap of the
negatives row by row (exact mode: the share of rows whose negatives are identical, and the mean share of
negatives in common). IVF rows (``--ivf``): hardneg on an IVF snapshot of the same corpus for both
configurations, overlap against exact hardneg and CPU/wall ratio against the same configuration's ST baseline.

Run (heavy at 1M: ~3 GiB, minutes): ``flock /tmp/hardneg-bench.lock .venv/bin/python bench/corpus_mining.py``.
Needs ``pip install 'hardneg[bench]'`` (sentence-transformers, datasets).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from unittest.mock import patch

import numpy as np
import torch

from hardneg.miner.formats import build_rows
from hardneg.miner.index import SearchParams, VectorIndex
from hardneg.miner.mining import MiningConfig, bf16_prefilter
from hardneg.miner.mining import queries
from hardneg.miner.mining.queries import PositiveSets, mine_queries


@dataclass(frozen=True)
class Corpus:
    docs: np.ndarray  # (n, d) float32 unit vectors
    topics: np.ndarray  # (n,) int64
    queries: np.ndarray  # (m, d) float32 unit vectors
    positives: list[list[int]]  # doc ids per query


def make_corpus(n: int, m: int, dim: int, topics: int, seed: int) -> Corpus:
    """Topic centres on the sphere; documents and queries at noise 1.2/sqrt(dim) per coordinate around them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t = rng.integers(0, topics, size=n)
    docs = centres[t] + (1.2 / np.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    qt = rng.integers(0, topics, size=m)
    queries = centres[qt] + (1.2 / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    order = np.argsort(t, kind="stable")
    bounds = np.searchsorted(t[order], np.arange(topics + 1))
    positives = []
    for q in qt:
        members = order[bounds[q]:bounds[q + 1]]
        positives.append(rng.choice(members, size=min(len(members), rng.integers(1, 4)), replace=False).tolist())
    return Corpus(docs, t.astype(np.int64), queries, positives)


class LookupModel:
    """A stand-in SentenceTransformer: ``encode_query`` / ``encode_document`` return the given vectors by text."""

    def __init__(self, corpus: Corpus) -> None:
        self.device = torch.device("cpu")
        self.model_card_data = SimpleNamespace(base_model="lookup")
        self.q = {f"q{i}": i for i in range(len(corpus.queries))}
        self.corpus = corpus

    def get_embedding_dimension(self) -> int:
        return self.corpus.docs.shape[1]

    def encode_query(self, texts: list[str], **_: object) -> np.ndarray:
        return self.corpus.queries[[self.q[t] for t in texts]]

    def encode_document(self, texts: list[str], **_: object) -> np.ndarray:
        return self.corpus.docs[[int(t[1:]) for t in texts]]

    def similarity(self, a, b) -> torch.Tensor:
        return torch.as_tensor(a) @ torch.as_tensor(b).T

    def similarity_pairwise(self, a, b) -> torch.Tensor:
        return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)


def clocks(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_st(corpus: Corpus, opts: dict, use_faiss: bool, depth: int | None) -> list[tuple]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = [(f"q{i}", f"d{p}") for i, ps in enumerate(corpus.positives) for p in ps]
    ds = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    # With "top" sampling the window's end only bounds how deep it looks: a margin that drops the nearest
    # candidates needs range_max deep enough to still fill the window (``depth``).
    st_opts = {**opts, "range_max": max(opts["range_max"], depth or 0)}
    out = mine_hard_negatives(ds, LookupModel(corpus), corpus=[f"d{j}" for j in range(len(corpus.docs))],
                              use_faiss=use_faiss, faiss_batch_size=16384 if use_faiss else 512,
                              output_format="n-tuple", sampling_strategy="top", verbose=False, **st_opts)
    cols = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, opts["num_negatives"] + 1)]
    return list(zip(*(out[c] for c in cols)))


def run_hardneg(index: VectorIndex, corpus: Corpus, opts: dict, params: SearchParams | None = None,
                one_pass: bool = True, prefilter: str = "auto") -> list[tuple]:
    """hardneg's rows; ``one_pass=False`` mines as before the one-pass scan (FAISS search, widened x8 per round);
    ``prefilter`` forces the scan's bfloat16 prefilter on (``bf16``) or off (``off``: the float32 scan)."""
    if not one_pass:
        with patch.object(queries, "_positives_floor_search", lambda *_: None):
            return run_hardneg(index, corpus, opts, params)
    if prefilter != "auto":
        with patch.object(bf16_prefilter, "wanted", lambda *_: prefilter == "bf16"):
            return run_hardneg(index, corpus, opts, params)
    cfg = MiningConfig(strategy="window", per_anchor=opts["num_negatives"], window_skip=opts["range_min"],
                       window_width=opts["range_max"] - opts["range_min"], window_sampling="top",
                       relative_margin=opts.get("relative_margin"))
    res = mine_queries(index, corpus.queries, cfg, positives=PositiveSets.from_lists(corpus.positives), params=params)
    rows = build_rows(res, "n-tuple", _Texts("q"), _Texts("d"))
    return list(zip(*rows.values()))


class _Texts(dict):
    """id -> "<prefix><id>", the texts the stub model knows, without building a million-entry dict."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def __getitem__(self, i: int) -> str:
        return f"{self.prefix}{i}"


def overlap(a: list[tuple], b: list[tuple]) -> dict:
    """Row by row over (query, positive): identical negative lists, and mean share of negatives in common."""
    ka = {(r[0], r[1]): r[2:] for r in a}
    kb = {(r[0], r[1]): r[2:] for r in b}
    common = ka.keys() & kb.keys()
    same = sum(ka[k] == kb[k] for k in common)
    shared = [len(set(ka[k]) & set(kb[k])) / len(ka[k]) for k in common]
    return {"rows_a": len(ka), "rows_b": len(kb), "rows_both": len(common),
            "identical_rows": same / max(1, len(common)), "mean_shared": float(np.mean(shared)) if shared else None}


def differing_rows_tied(a: list[tuple], b: list[tuple], corpus: Corpus, relative_margin: float | None,
                        atol: float = 5e-7) -> dict:
    """Of the (query, positive) rows both wrote whose negatives differ: how many come from float32 ties, i.e. both
    lists' exact (float64) scores agree place by place within ``atol`` (a few float32 steps at cosine scores), or,
    under a relative margin, some document lies within ``atol`` of the margin's cap (of one of the query's
    positives), so that rounding decides whether it is dropped and the window after it shifts by one."""
    ka = {(r[0], r[1]): r[2:] for r in a}
    kb = {(r[0], r[1]): r[2:] for r in b}
    differ = sorted(k for k in ka.keys() & kb.keys() if ka[k] != kb[k])
    if not differ:
        return {"differing_rows": 0, "of_them_ties": 0}
    # Every document's float64 score against each query with a differing row, in one product.
    queries = sorted({int(k[0][1:]) for k in differ})
    column = {qi: j for j, qi in enumerate(queries)}
    scores = corpus.docs.astype(np.float64) @ corpus.queries[queries].astype(np.float64).T  # (n, queries)
    tied = 0
    for k in differ:
        qi = int(k[0][1:])
        s = scores[:, column[qi]]
        sa, sb = s[[int(t[1:]) for t in ka[k]]], s[[int(t[1:]) for t in kb[k]]]
        at_cap = False
        if relative_margin is not None:
            pos = s[corpus.positives[qi]]
            caps = pos - np.abs(pos) * relative_margin  # sentence-transformers' rule
            at_cap = bool((np.abs(s[:, None] - caps[None]) < atol).any())
        tied += bool(np.allclose(sa, sb, rtol=0, atol=atol)) or at_cap
    return {"differing_rows": len(differ), "of_them_ties": tied}


def bench_size(n: int, args: argparse.Namespace) -> dict:
    corpus = make_corpus(n, args.queries, args.dim, args.topics, args.seed)
    (index, build_wall, build_cpu) = clocks(lambda: VectorIndex.build(corpus.docs, corpus.topics, metric="cosine"))
    out: dict = {"n": n, "queries": args.queries, "dim": args.dim, "build_wall": build_wall, "build_cpu": build_cpu,
                 "configs": []}
    exact_rows: dict[str, tuple[list[tuple], dict, dict]] = {}
    for name, opts, depth in (("top", {"num_negatives": 5, "range_min": 0, "range_max": 5}, None),
                              ("window+relative_margin", {"num_negatives": 5, "range_min": 3, "range_max": 8,
                                                          "relative_margin": 0.05}, args.st_depth)):
        rec: dict = {"name": name, "options": opts, "st_range_max": max(opts["range_max"], depth or 0)}
        hn, rec["hardneg_wall"], rec["hardneg_cpu"] = clocks(lambda: run_hardneg(index, corpus, opts))
        rec["bf16_prefilter"] = bf16_prefilter.wanted("auto", args.queries, n, args.dim)
        if args.float32:
            f32, rec["float32_wall"], rec["float32_cpu"] = clocks(lambda: run_hardneg(index, corpus, opts,
                                                                                      prefilter="off"))
            rec["float32_overlap"] = overlap(f32, hn)
            rec["float32_overlap"].update(differing_rows_tied(f32, hn, corpus, opts.get("relative_margin")))
        if args.before:
            old, rec["before_wall"], rec["before_cpu"] = clocks(lambda: run_hardneg(index, corpus, opts, one_pass=False))
            rec["before_overlap"] = overlap(old, hn)
        variants = [True] + ([False] if n <= args.torch_max else [])
        best = None
        for use_faiss in variants:
            st, wall, cpu = clocks(lambda: run_st(corpus, opts, use_faiss, depth))
            rec[f"st_{'faiss' if use_faiss else 'torch'}_wall"], rec[f"st_{'faiss' if use_faiss else 'torch'}_cpu"] = \
                wall, cpu
            if best is None or wall < best[1]:
                best = (st, wall, cpu, "faiss" if use_faiss else "torch")
        st, wall, cpu, how = best
        rec["st_best"] = how
        rec["ratio_wall"] = wall / rec["hardneg_wall"]
        rec["ratio_cpu"] = cpu / rec["hardneg_cpu"]
        rec["ratio_wall_with_build"] = wall / (rec["hardneg_wall"] + build_wall)
        rec["overlap"] = overlap(st, hn)
        rec["overlap"].update(differing_rows_tied(st, hn, corpus, opts.get("relative_margin")))
        if args.before:
            rec["before_ratio_cpu"], rec["before_ratio_wall"] = cpu / rec["before_cpu"], wall / rec["before_wall"]
        if args.float32:
            rec["float32_ratio_cpu"], rec["float32_ratio_wall"] = cpu / rec["float32_cpu"], wall / rec["float32_wall"]
        print(json.dumps(rec), flush=True)
        out["configs"].append(rec)
        exact_rows[name] = (hn, opts, {"wall": wall, "cpu": cpu, "how": how})
    if args.ivf:
        (ivf, ivf_wall, ivf_cpu) = clocks(lambda: VectorIndex.build(corpus.docs, corpus.topics, metric="cosine",
                                                                   index="ivf", seed=args.seed))
        for name, (exact, opts, st) in exact_rows.items():
            for nprobe in args.nprobe:
                got, wall, cpu = clocks(lambda: run_hardneg(ivf, corpus, opts, SearchParams(nprobe=nprobe)))
                rec = {"name": f"ivf {name} nprobe={nprobe}", "build_wall": ivf_wall, "build_cpu": ivf_cpu,
                       "hardneg_wall": wall, "hardneg_cpu": cpu, "overlap_vs_exact": overlap(exact, got),
                       "ratio_cpu_vs_st": st["cpu"] / cpu, "ratio_wall_vs_st": st["wall"] / wall,
                       "st_best": st["how"], "factory": ivf.spec.factory}
                print(json.dumps(rec), flush=True)
                out["configs"].append(rec)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--topics", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-max", type=int, default=1_000_000, help="largest corpus for ST's use_faiss=False run")
    p.add_argument("--st-depth", type=int, default=2000,
                   help="sentence-transformers' range_max under the margin (deep enough to fill the window)")
    p.add_argument("--ivf", action="store_true", help="also mine an IVF snapshot (approximate)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--before", action="store_true",
                   help="also time hardneg without the one-pass scan (FAISS flat search, widening x8), as before it")
    p.add_argument("--float32", action="store_true",
                   help="also time hardneg's scan without its bfloat16 prefilter (every score in float32)")
    p.add_argument("--out", help="write the records as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Import sentence-transformers and datasets before any clock starts, so the first baseline run is not
    # charged their import time (several CPU seconds).
    import datasets  # noqa: F401
    import sentence_transformers.util  # noqa: F401

    # hardneg's scan imports torch for its bfloat16 product when it is not imported yet (a run of `hardneg mine`
    # from 2^36 multiply-adds); sentence-transformers imported it above, so its cost is measured apart.
    t0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    t1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"torch_import_cpu": t1.ru_utime + t1.ru_stime - t0.ru_utime - t0.ru_stime}), flush=True)
    records = []
    for n in args.sizes:
        print(f"# corpus {n}: load average {os.getloadavg()}", flush=True)
        records.append(bench_size(n, args))
    # Measured once, at hardneg's first scan (inside its clock); "auto" takes bfloat16 from 1.5x.
    print(json.dumps({"bf16_speedup": bf16_prefilter.bf16_speedup()}))
    print(f"# done: load average {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
