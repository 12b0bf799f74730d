"""The per-device memory estimate: activations against what autograd really keeps, and jobs refused before
any pod starts when they cannot fit."""

import pytest
import torch
import transformers
import yaml

from potential_meme.spec import parse_job
from potential_meme.spec.aliases import Architecture
from potential_meme.spec.memory import (
    activation_elements_per_token,
    fit_refusal,
    memory_plan,
    quantity_bytes,
)

from helpers import cli, config_of

SHAPES = [
    Architecture(hidden_size=64, num_layers=4, intermediate_size=224, num_heads=4, num_kv_heads=2, vocab_size=512),
    Architecture(hidden_size=128, num_layers=3, intermediate_size=352, num_heads=8, num_kv_heads=8, vocab_size=512),
]


def saved_activation_bytes(shape: Architecture, gradient_checkpointing: bool, batch: int, length: int) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of transformers' Llama (weights excluded)."""
    config = config_of(shape, use_cache=False)
    model = transformers.LlamaForCausalLM(config).train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.model(input_ids=torch.randint(0, shape.vocab_size, (batch, length)))
    return sum(saved.values())


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa", "mha"])
def test_activation_estimate_is_what_autograd_keeps(shape):
    batch, length = 2, 128
    measured = saved_activation_bytes(shape, False, batch, length)
    estimated = activation_elements_per_token(shape, False) * batch * length * 4
    assert estimated == pytest.approx(measured, rel=0.10)
    # with checkpointing, the forward keeps layer inputs; the estimate adds the one layer recomputed in backward
    checkpointed = saved_activation_bytes(shape, True, batch, length)
    layer_inputs = shape.num_layers * shape.hidden_size * batch * length * 4
    assert layer_inputs <= checkpointed < activation_elements_per_token(shape, True) * batch * length * 4 < measured


def job(teacher: str, student: dict, resources: dict, **training) -> dict:
    return {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "llama3-70b-to-7b"},
        "spec": {
            "teacher": {"model": teacher},
            "student": student,
            "dataset": {"source": "s3://corpora/web/"},
            "method": {"knowledge": {}},
            "training": {"batchSize": 4, "maxSeqLength": 2048, "gradientCheckpointing": True, **training},
            "output": {"uri": "s3://models/runs"},
            "resources": resources,
        },
    }


def test_the_design_documents_70b_to_7b_needs_sharding_on_80gb_gpus():
    """The teacher alone is 141 GB in bf16: a whole copy per GPU cannot fit, whatever the student; sharded over
    one node's 8 GPUs it does."""
    document = job("llama3-70b", {"model": "llama3-7b"}, {"nodes": 1, "gpusPerNode": 8, "gpuMemory": "80Gi"})
    document["spec"]["training"]["strategy"] = "ddp"
    whole = memory_plan(parse_job(document))
    assert whole.strategy == "ddp" and whole.fits is False
    assert whole.per_device.teacher == 70_553_706_496 * 2  # bf16 on GPUs
    assert whole.per_device.student == 8_030_261_248 * 16  # fp32 weights, gradients, AdamW's two moments
    refusal = fit_refusal(parse_job(document))
    assert refusal.startswith("spec.resources.gpuMemory: the first training stage needs ddp over 8 process(es), 2")
    assert "does not fit in 68.0 GiB usable of 80.0 GiB" in refusal and "set training.strategy fsdp" in refusal
    assert "gradientCheckpointing" not in refusal  # already set: not offered as a remedy

    document["spec"]["training"]["strategy"] = "auto"
    sharded = memory_plan(parse_job(document))
    assert (sharded.strategy, sharded.processes, sharded.fits) == ("fsdp", 8, True)
    assert sharded.reason == "auto: whole copies would need 257.7 GiB per device, over the headroom"
    assert sharded.per_device.teacher < whole.per_device.teacher / 4  # layers split 8 ways, the rest whole
    assert sharded.per_device.activations == whole.per_device.activations  # each process still runs its batch
    assert fit_refusal(parse_job(document)) is None

    document["spec"]["resources"]["gpuMemory"] = "40Gi"
    refusal = fit_refusal(parse_job(document))
    assert "fsdp over 8 process(es)" in refusal and "run on 21 nodes (resources.nodes)" in refusal
    document["spec"]["resources"]["nodes"] = 21
    assert memory_plan(parse_job(document)).fits and memory_plan(parse_job(document)).processes == 168


def test_a_cached_teacher_is_not_counted_but_the_stage_that_makes_the_cache_is_judged(tmp_path):
    """Training from a cache holds no teacher, but a 7B student with its optimizer state (120 GiB) is still
    sharded by auto. Making the cache runs the teacher forward-only: a 70B one fits 8 x 80 GB sharded, not whole."""
    resources = {"gpusPerNode": 8, "gpuMemory": "80Gi"}
    online = memory_plan(parse_job(job("llama3-70b", {"model": "llama3-7b"}, resources)))
    reading = job("llama3-70b", {"model": "llama3-7b"}, resources)
    reading["spec"]["teacher"]["cache"] = {"uri": "s3://models/runs/cache-70b/cache-teacher/"}
    cached = memory_plan(parse_job(reading))
    assert cached.strategy == online.strategy == "fsdp"
    assert cached.reason == "auto: whole copies would need 123.3 GiB per device, over the headroom"
    assert cached.per_device.teacher == 0 and cached.per_device.student == online.per_device.student
    assert cached.per_device.activations < online.per_device.activations  # no teacher forward
    assert "no teacher" in cached.describe() and " fits in 68.0 GiB" in cached.describe()
    assert fit_refusal(parse_job(reading)) is None  # made elsewhere: this job runs no cache-teacher stage

    making = job("llama3-70b", {"model": "llama3-7b"}, resources)
    making["spec"]["teacher"]["cache"] = {"topK": 32}
    assert fit_refusal(parse_job(making)) is None  # auto shards the teacher over the node's 8 GPUs
    (tmp_path / "cached.yaml").write_text(yaml.safe_dump(making))
    rendered = cli("render", str(tmp_path / "cached.yaml"))
    assert rendered.returncode == 0, rendered.stderr
    assert (
        "memory estimate of the cache-teacher stage 26.1 GiB per device with the teacher sharded over 8 process(es); "
        "fits in 68.0 GiB usable of 80.0 GiB"
    ) in rendered.stderr
    assert "memory estimate fsdp over 8 process(es), 35.6 GiB per device" in rendered.stderr  # the distill stage
    making["spec"]["training"]["strategy"] = "ddp"
    refusal = fit_refusal(parse_job(making))
    assert refusal.startswith(
        "spec.resources.gpuMemory: the cache-teacher stage needs 134.5 GiB per device with a whole teacher on each "
        "device; does not fit in 68.0 GiB usable of 80.0 GiB"
    )
    assert "set training.strategy fsdp (or auto)" in refusal
    making["spec"]["training"]["strategy"] = "auto"
    making["spec"]["resources"] = {**resources, "gpuMemory": "24Gi"}
    refusal = fit_refusal(parse_job(making))
    assert "needs 26.1 GiB per device with the teacher sharded over 8 process(es)" in refusal
    assert "run on 2 nodes (resources.nodes)" in refusal
    smaller = job("llama3-8b", {"fromTeacher": {"numLayers": 4}}, resources)
    smaller["spec"]["teacher"]["cache"] = {"topK": 32}
    assert fit_refusal(parse_job(smaller)) is None
    auto = memory_plan(parse_job(smaller))
    assert auto.strategy == "ddp" and auto.reason == "auto: whole copies of the student, as it fits"


def test_a_job_that_fits_is_planned_and_an_undeclared_device_is_not_judged():
    small = job("smollm2-1.7b", {"fromTeacher": {"numLayers": 12}}, {"gpusPerNode": 1, "gpuMemory": "24Gi"})
    plan = memory_plan(parse_job(small))
    assert plan.fits is True and fit_refusal(parse_job(small)) is None
    derived = Architecture.model_validate(
        {"hiddenSize": 2048, "numLayers": 12, "intermediateSize": 8192, "numHeads": 32, "numKvHeads": 32}
        | {"vocabSize": 49152, "tiedEmbeddings": True}
    )
    assert plan.per_device.student == derived.parameters * 16
    del small["spec"]["resources"]["gpuMemory"]
    assert memory_plan(parse_job(small)).fits is None  # unknown capacity: said, never refused
    assert "device memory not declared" in memory_plan(parse_job(small)).describe()
    on_cpu = job("smollm2-135m", {"fromTeacher": {"numLayers": 15}}, {"memory": "512Mi"}, precision="fp32")
    assert fit_refusal(parse_job(on_cpu)).startswith("spec.resources.memory:")  # fp32 on CPU: 4 bytes a weight


def test_unknown_sizes_are_not_estimated():
    hub = job("HuggingFaceTB/SmolLM2-135M-Instruct", {"fromTeacher": {"numLayers": 4}}, {"memory": "1Mi"})
    assert memory_plan(parse_job(hub)) is None and fit_refusal(parse_job(hub)) is None


@pytest.mark.parametrize(
    ("quantity", "count"), [("80Gi", 80 * 2**30), ("512Mi", 2**29), ("1.5G", 1_500_000_000), ("1Ti", 2**40), ("64", 64)]
)
def test_quantities_in_bytes(quantity, count):
    assert quantity_bytes(quantity) == count


def test_render_refuses_what_the_operator_would_and_shows_the_estimate_of_the_rest(tmp_path):
    too_big = tmp_path / "too-big.yaml"
    too_big.write_text(
        yaml.safe_dump(job("llama3-70b", {"model": "llama3-7b"}, {"gpusPerNode": 8, "gpuMemory": "40Gi"}))
    )
    refused = cli("render", str(too_big))
    assert refused.returncode == 2 and refused.stdout == ""
    assert "not rendered, the operator would refuse it: spec.resources.gpuMemory:" in refused.stderr
    fits = tmp_path / "fits.yaml"
    fits.write_text(yaml.safe_dump(job("llama3-70b", {"model": "llama3-7b"}, {"gpusPerNode": 8, "gpuMemory": "80Gi"})))
    rendered = cli("render", str(fits))
    assert rendered.returncode == 0, rendered.stderr
    assert "memory estimate fsdp over 8 process(es), 61.5 GiB per device" in rendered.stderr
    assert "fits in 68.0 GiB usable of 80.0 GiB" in rendered.stderr
    objects = list(yaml.safe_load_all(rendered.stdout))
    aliases = yaml.safe_load(objects[0]["data"]["model-aliases.yaml"])
    assert aliases["llama3-70b"]["model"] == "meta-llama/Meta-Llama-3-70B"  # the pods resolve it as planned
    assert aliases["llama3-7b"]["architecture"]["numLayers"] == 32
    [container] = objects[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert {"name": "POTENTIAL_MEME_DEVICE_MEMORY", "value": "80Gi"} in container["env"]  # the pods judge alike
