"""facecompat.index.certified: a certificate read by the gallery side, and the one-line errors of a file
that is not one, or one that names no model versions."""

from __future__ import annotations

import json

import pytest

from facecompat.index.certified import CertificateError, pair_for, read_certified_pairs
from tests.helpers.errors import raises_one_line


def _cert(versions: dict) -> dict:
    cell = {"1:1": {"0.01": {"tar": 0.9, "threshold": 0.5}, "0.001": {"unresolved": "too few"}}}
    return {"format": "facecompat-certificate", "versions": versions, "candidates": ["bct"],
            "cross_cells": {"bct": "bct|old"}, "operating_far": "0.01",
            "decision": {"bct": {"far": "0.01", "decision": "compatible"}},
            "cells": {"old|old": cell, "bct|old": cell, "bct|bct": cell}}


def test_pairs_carry_decisions_and_thresholds(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_cert({"old": "r18-aaa", "bct": "r50-bbb"})))
    pairs = read_certified_pairs(path)
    cross = pair_for(pairs, "r50-bbb", "r18-aaa")
    assert cross.compatible and cross.cell == "bct|old" and cross.threshold("0.01") == 0.5
    assert pair_for(pairs, "r50-bbb", "r50-bbb").decision == "self" and pair_for(pairs, "x", "y") is None
    raises_one_line(CertificateError, r"cell bct\|old has no threshold at FAR 0.001 \(resolved: 0.01\)",
                    cross.threshold, "0.001")


@pytest.mark.parametrize("content,message", [
    (None, "no such certificate"),
    ("{not json", "not a readable certificate"),
    (json.dumps({"format": "other"}), "not a facecompat certificate \\(format 'other'\\)"),
    (json.dumps([1, 2]), "not a facecompat certificate$"),
    (json.dumps(_cert({})), "made from precomputed features"),
])
def test_bad_certificates_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    raises_one_line(CertificateError, f"^{path}: {message}", read_certified_pairs, path)
