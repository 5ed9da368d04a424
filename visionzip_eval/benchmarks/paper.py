"""The VisionZip paper's published numbers, kept as data (``paper_results.csv``,
``paper_efficiency.csv`` next to this file), and the rule that decides when a measured model
is the paper's model (its ``pretrained`` id, or a local folder with the same name).

These are secondary transcriptions of arXiv 2412.04467: approximate. Every place that prints
them says so (:data:`PAPER_NOTE`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources

import pandas as pd

from visionzip_eval.benchmarks import BENCHMARKS

PAPER_MARK = "†"
PAPER_NOTE = (
    f"{PAPER_MARK} Published numbers of the VisionZip paper (Yang et al., arXiv 2412.04467, Table 1; "
    "approximate secondary transcriptions, check the paper before citing). Their Avg is recomputed "
    "over the benchmarks shown here, relative to the paper's own vanilla row."
)
MME_NOTE = (
    "The paper's MME (1862 for LLaVA-1.5-7B) matches perception + cognition; LLaVA-1.5-7B's "
    "perception score alone is about 1510. Compare like for like with `--mme total`."
)


def _read(name: str) -> pd.DataFrame:
    with resources.files("visionzip_eval.benchmarks").joinpath(name).open("r", encoding="utf-8") as handle:
        frame = pd.read_csv(handle, comment="#", dtype={"budget": str})
    return frame


@lru_cache(maxsize=None)
def _results() -> pd.DataFrame:
    return _read("paper_results.csv")


@lru_cache(maxsize=None)
def _efficiency() -> pd.DataFrame:
    return _read("paper_efficiency.csv")


def paper_results() -> pd.DataFrame:
    """One row per published (model, method, budget): benchmark columns, ``avg_reported``."""
    return _results().copy()


def paper_efficiency() -> pd.DataFrame:
    return _efficiency().copy()


def _normalise(name: str) -> str:
    return str(name).strip().rstrip("/").lower()


def paper_model_for(pretrained: str | None) -> str | None:
    """The paper's model key (``llava-1.5-7b``) if ``pretrained`` is one of its checkpoints:
    the hub id itself, or a local folder named like it (``/models/llava-1.5-7b-hf``)."""
    if not pretrained or (isinstance(pretrained, float) and math.isnan(pretrained)):
        return None
    wanted = _normalise(pretrained)
    base = wanted.rsplit("/", 1)[-1]
    for _, row in _results().drop_duplicates("paper_model").iterrows():
        for candidate in str(row["pretrained"]).split("|"):
            candidate = _normalise(candidate)
            if wanted == candidate or base == candidate.rsplit("/", 1)[-1]:
                return str(row["paper_model"])
    return None


def paper_rows(pretrained: str | None) -> pd.DataFrame:
    """The paper's rows for this checkpoint (empty when it is not the paper's model)."""
    key = paper_model_for(pretrained)
    table = _results()
    if key is None:
        return table.iloc[0:0].copy()
    return table[table["paper_model"] == key].reset_index(drop=True)


def paper_efficiency_rows(pretrained: str | None) -> pd.DataFrame:
    key = paper_model_for(pretrained)
    table = _efficiency()
    if key is None:
        return table.iloc[0:0].copy()
    return table[table["paper_model"] == key].reset_index(drop=True)


PAPER_BENCHMARKS = tuple(b.key for b in BENCHMARKS if b.key in _results().columns)
