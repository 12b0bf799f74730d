"""Augmented distillation end to end: the teacher rewrites training passages (stage augment), the student is
distilled on the corpus and the kept variants (stage distill); the library's AugmentedDistiller runs the same."""

import hashlib
import json

import yaml

from potential_meme.distillation import AugmentedDistiller
from potential_meme.engine.data import load_documents
from potential_meme.spec.models import DatasetSpec

from helpers import cli

KEEP_ANYTHING = {
    "shortestShare": 0.01,
    "longestShare": 100,
    "nearDuplicateSimilarity": 1.0,
}  # a tiny random teacher writes noise


def test_an_augmented_job_rewrites_training_passages_only_and_distills_on_them_too(
    chat_model_dir, corpus_dir, tmp_path
):
    method = {"factor": 2, "maxPassages": 5, "passageCharacters": 200, "generation": {"maxNewTokens": 24}}
    document = {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "augmented"},
        "spec": {
            "teacher": {"model": str(chat_model_dir)},
            "student": {"fromTeacher": {"numLayers": 1}},
            "dataset": {"source": str(corpus_dir), "validationFraction": 0.3},
            "method": {"augmented": {**method, **KEEP_ANYTHING}},
            "training": {"batchSize": 4, "maxSteps": 4, "maxSeqLength": 64, "learningRate": 1e-3},
            "output": {"uri": str(tmp_path / "runs")},
        },
    }
    job = tmp_path / "augmented.yaml"
    job.write_text(yaml.safe_dump(document))
    result = cli("run", str(job), "--metrics-port", "0")
    assert result.returncode == 0, result.stderr

    augment = json.loads((tmp_path / "runs/augmented/augment/manifest.json").read_text())
    counts = augment["metrics"]["variants"]
    assert augment["metrics"]["passages"] == 5
    assert counts["paraphrase"]["written"] == 10 and counts["back_translation"]["written"] <= 10
    assert augment["metrics"]["variantsKept"] == sum(c["kept"] for c in counts.values()) > 0
    kept_file = tmp_path / "runs/augmented/augment/augmented.jsonl"
    entry = next(f for f in augment["files"] if f["path"] == "augmented.jsonl")
    assert entry["sha256"] == hashlib.sha256(kept_file.read_bytes()).hexdigest()
    variants = [json.loads(line) for line in kept_file.read_text().splitlines()]
    train, held_out = load_documents(DatasetSpec(source=str(corpus_dir), validation_fraction=0.3))
    assert {v["group"] for v in variants} <= {d.group for d in train}  # held-out text is never rewritten
    assert not {v["group"] for v in variants} & {d.group for d in held_out}

    distill = json.loads((tmp_path / "runs/augmented/distill/manifest.json").read_text())["metrics"]
    assert distill["augmentedDocuments"] == len(variants) and distill["trainDocuments"] == len(train)
    assert "variants kept of 5 passages" in result.stdout


def test_augmented_distiller_reports_what_each_method_kept(chat_model_dir, corpus_dir, tmp_path):
    distiller = AugmentedDistiller(
        str(chat_model_dir),
        1,
        shortest_share=0.01,
        longest_share=100,
        near_duplicate_similarity=1.0,
        output_uri=str(tmp_path / "runs"),
        verbose=False,
    )
    metrics = distiller.distill_with_augmentation(
        str(corpus_dir), ["paraphrase"], augmentation_factor=1, max_passages=3, max_steps=2, max_seq_length=64
    )
    assert metrics["augmentedDocuments"] == distiller.results[0]["metrics"]["variantsKept"]
    assert set(distiller.results[0]["metrics"]["variants"]) == {"paraphrase"}
