"""Shared fixtures: the micro zoo (built once, cached under $HARNESS_HOME), and a throwaway store."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.fixture(scope="session")
def micro_zoo():
    """name -> folder of every model of the micro profile (built on first use, then reused)."""
    from harness import zoo

    return zoo.build("micro", log=lambda msg: print(f"[micro zoo] {msg}"))


@pytest.fixture(scope="session")
def tokenizer(micro_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_zoo["qwen-tokenizer"])


@pytest.fixture
def tmp_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "store"))
    return tmp_path / "store"
